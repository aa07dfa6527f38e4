"""GaLore AdamW (offload/galore.py): the projections, parity with galore-torch, layer-wise with accumulation,
exact resume from a weights_only checkpoint, and the trainer's galore_adamw runs."""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
from conftest import tiny_model_config, train_losses, write_yaml

from longtune.offload.galore import GaloreAdamW, GaloreOptions
from longtune.offload.galore_projection import (project, project_back, random_basis, randomized_basis,
                                                rotate_moments, side_of, svd_basis)


def _model(seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = tiny_model_config()
    cfg["vocab_size"] = 256
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))


def _batches(n: int, seed: int = 1, tokens: int = 32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, tokens), generator=g) for _ in range(n)]


def _loss(model, ids):
    return model(input_ids=ids, labels=ids, use_cache=False).loss


# --- the projections ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(48, 20), (20, 48)], ids=["tall-right", "wide-left"])
def test_svd_basis_is_the_top_singular_subspace(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    basis = svd_basis(g, 5)
    side = side_of(shape)
    assert basis.shape == ((5, shape[1]) if side == "right" else (shape[0], 5))
    gram = basis @ basis.t() if side == "right" else basis.t() @ basis
    torch.testing.assert_close(gram, torch.eye(5), atol=1e-5, rtol=0)
    # projecting and back is the best rank-5 approximation on that side: equal to the truncated SVD
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    best = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
    torch.testing.assert_close(project_back(project(g, basis), basis, side, 1.0), best, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_randomized_basis_finds_the_svd_subspace_and_warm_starts(shape):
    gen = torch.Generator().manual_seed(0)
    m, n = shape
    low_rank = torch.randn(m, 6, generator=gen) @ torch.diag(torch.tensor([50., 40, 30, 20, 10, 5])) @ torch.randn(6, n, generator=gen)
    g = low_rank + 0.01 * torch.randn(m, n, generator=gen)
    exact, side = svd_basis(g, 6), side_of(shape)
    fast = randomized_basis(g, 6, None, torch.Generator().manual_seed(1))

    def cosines(a, b):  # singular values of A^T B: the cosines of the principal angles between the subspaces
        a, b = (a.t(), b.t()) if side == "right" else (a, b)
        return torch.linalg.svdvals(a.t() @ b)

    assert cosines(exact, fast).min() > 0.9999
    warm = randomized_basis(g + 0.01 * torch.randn(m, n, generator=gen), 6, fast, torch.Generator().manual_seed(2))
    assert cosines(exact, warm).min() > 0.999


def test_random_basis_is_regenerated_not_stored():
    a = random_basis((64, 16), 4, seed=3, index=2, refresh=5, dtype=torch.float32, device=torch.device("cpu"))
    b = random_basis((64, 16), 4, seed=3, index=2, refresh=5, dtype=torch.float32, device=torch.device("cpu"))
    c = random_basis((64, 16), 4, seed=3, index=2, refresh=6, dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a @ a.t(), torch.eye(4), atol=1e-5, rtol=0)


def test_rotating_moments_into_the_same_subspace_keeps_them():
    gen = torch.Generator().manual_seed(0)
    old = torch.linalg.qr(torch.randn(16, 4, generator=gen))[0].t().contiguous()  # a right basis (4, 16)
    perm = old[[2, 0, 3, 1]]  # the same subspace, directions reordered
    m, v = torch.randn(10, 4, generator=gen), torch.rand(10, 4, generator=gen)
    m2, v2 = m.clone(), v.clone()
    rotate_moments(m2, v2, old, perm, "right")
    torch.testing.assert_close(m2, m[:, [2, 0, 3, 1]])
    torch.testing.assert_close(v2, v[:, [2, 0, 3, 1]])


# --- the optimizer ----------------------------------------------------------------------------------------

OPTS = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)


def _galore(model, clip=None, process_group=None, **options):
    options = {"rank": 4, "update_proj_gap": 5, "scale": 0.25, **options}
    return GaloreAdamW(model.named_parameters(), GaloreOptions(**options), clip_grad_norm=clip,
                       process_group=process_group, **OPTS)


def _train(model, opt, batches, accum: int = 1):
    losses = []
    for i in range(0, len(batches), accum):
        opt.expect_backwards(accum)
        total = 0.0
        for ids in batches[i:i + accum]:
            loss = _loss(model, ids) / accum
            loss.backward()
            total += float(loss.detach())
        opt.clip_and_step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def test_parity_with_galore_torch_svd_20_steps():
    galore_torch = pytest.importorskip("galore_torch", reason="galore-torch is not installed (pip install galore-torch)")
    ours_model, ref_model = _model(), _model()
    ours = _galore(ours_model, stagger=False)
    targets = set(ours.target_names)
    named = list(ref_model.named_parameters())
    ref = galore_torch.GaLoreAdamW([
        {"params": [p for n, p in named if n in targets], "rank": 4, "update_proj_gap": 5, "scale": 0.25,
         "proj_type": "std"},
        {"params": [p for n, p in named if n not in targets and p.ndim >= 2]},
        {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0},
    ], no_deprecation_warning=True, **OPTS)
    batches = _batches(20)
    ours_losses = _train(ours_model, ours, batches)
    ref_losses = []
    for ids in batches:
        loss = _loss(ref_model, ids)
        loss.backward()
        ref.step()
        ref.zero_grad(set_to_none=True)
        ref_losses.append(float(loss.detach()))
    assert ours_losses[0] == ref_losses[0]
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert ours_losses[-1] < ours_losses[0]


@pytest.mark.parametrize("projector", ["svd", "randomized", "random"])
def test_layerwise_with_accumulation_equals_stepping_after_backward(projector):
    plain_model, layerwise_model = _model(), _model()
    plain = _galore(plain_model, projector=projector, update_proj_gap=3)
    layerwise = _galore(layerwise_model, projector=projector, update_proj_gap=3)
    layerwise.attach_layerwise()
    batches = _batches(6 * 4)
    a = _train(plain_model, plain, batches, accum=4)
    b = _train(layerwise_model, layerwise, batches, accum=4)
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
    for (name, x), (_, y) in zip(plain_model.named_parameters(), layerwise_model.named_parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)
        assert y.grad is None  # every gradient was freed in its hook


def test_layerwise_refuses_clipping():
    with pytest.raises(ValueError, match="clip"):
        _galore(_model(), clip=1.0).attach_layerwise()


def test_refreshes_are_staggered():
    model = _model()
    opt = _galore(model, update_proj_gap=4)
    refreshed_per_step = []
    for ids in _batches(9):
        _loss(model, ids).backward()
        before = {p: opt.state[p].get("refreshes", 0) for p in opt.param_groups[0]["params"]}
        opt.step()
        opt.zero_grad(set_to_none=True)
        refreshed_per_step.append(sum(opt.state[p]["refreshes"] > before[p] for p in before))
    n = len(opt.param_groups[0]["params"])
    assert refreshed_per_step[0] == n  # every weight needs a first basis
    assert sum(refreshed_per_step[1:]) == 2 * n and max(refreshed_per_step[1:]) < n  # then spread out


@pytest.mark.parametrize("projector", ["svd", "random"])
def test_resume_between_refreshes_is_bitwise_with_weights_only(projector):
    batches = _batches(9)
    straight_model = _model()
    straight = _galore(straight_model, projector=projector, on_refresh="rotate")
    expected = _train(straight_model, straight, batches)

    first_model = _model()
    first = _galore(first_model, projector=projector, on_refresh="rotate")
    _train(first_model, first, batches[:7])  # refreshes at steps 0 and 5 (plus staggered ones): 7 is between
    buffer = io.BytesIO()
    torch.save({"model": first_model.state_dict(), "optim": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    if projector == "random":  # no basis is stored: three integers regenerate it
        assert all("basis" not in s for s in saved["optim"]["state"].values())
    resumed_model = _model(seed=123)
    resumed_model.load_state_dict(saved["model"])
    resumed = _galore(resumed_model, projector=projector, on_refresh="rotate")
    resumed.load_state_dict(saved["optim"])
    assert _train(resumed_model, resumed, batches[7:]) == expected[7:]


RESUME_STEPS, RESUME_GAP, RESUME_ACCUM = 7, 3, 2


def _resume_matrix():
    """Every projector x stagger x on_refresh, each with one of the four layer-wise x 8-bit combinations, chosen
    so that every projector meets all four and every stagger or on_refresh value all four too (12 of the 48
    cases, which all pass: about 0.3 s a case on an idle machine, several under load)."""
    extras = [(False, False), (True, False), (False, True), (True, True)]  # (layerwise, eight_bit)
    cases = []
    for i, p in enumerate(("svd", "randomized", "random")):
        for j, (s, r) in enumerate([(True, "keep"), (True, "rotate"), (False, "keep"), (False, "rotate")]):
            lw, q = extras[(i + j) % 4]
            cases.append(pytest.param(p, s, r, lw, q, id=f"{p}-{'stagger' if s else 'aligned'}-{r}"
                                                         f"{'-layerwise' if lw else ''}{'-8bit' if q else ''}"))
    return cases


@pytest.mark.parametrize("projector, stagger, on_refresh, layerwise, eight_bit", _resume_matrix())
def test_resume_is_bitwise_before_on_and_after_a_refresh(projector, stagger, on_refresh, layerwise, eight_bit,
                                                         monkeypatch):
    """A run checkpointed (weights_only) after 2, 3 and 4 of its 7 steps and resumed in a fresh model and optimizer
    gives the straight run's losses and weights bit for bit. The learning rate changes every step (a warmup, then a
    decay, as the trainer's schedules), and the scheduler is built before the load, as the trainer does: the
    updates once read a stale rate after a load. Refreshes are every 3 steps: unstaggered, the 4th step refreshes,
    so the resumed runs start a step before, on and after it; staggered, each weight has its own of the three."""
    if eight_bit:
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
        import longtune.offload.galore as galore

        monkeypatch.setattr(galore, "MIN_8BIT_NUMEL", 0)  # every moment in 8 bits (the tiny model's are small)
    options = dict(projector=projector, stagger=stagger, on_refresh=on_refresh, eight_bit=eight_bit,
                   update_proj_gap=RESUME_GAP)
    batches = _batches(RESUME_STEPS * RESUME_ACCUM)

    def build(model):
        opt = _galore(model, **options)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * (1.0 - s / 10))
        return opt, schedule

    def train(model, opt, schedule, start, checkpoints=()):
        if layerwise:
            opt.attach_layerwise()
        losses, saved = [], {}
        for step in range(start, RESUME_STEPS):
            losses.append(_train(model, opt, batches[step * RESUME_ACCUM:(step + 1) * RESUME_ACCUM], RESUME_ACCUM)[0])
            schedule.step()
            if step + 1 in checkpoints:
                buffer = io.BytesIO()
                torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "schedule": schedule.state_dict()},
                           buffer)
                saved[step + 1] = buffer.getvalue()
        return losses, saved

    straight_model = _model()
    expected, checkpoints = train(straight_model, *build(straight_model), 0, checkpoints=(2, 3, 4))
    differ = []
    for at, data in checkpoints.items():
        saved = torch.load(io.BytesIO(data), weights_only=True)
        model = _model(seed=123)
        model.load_state_dict(saved["model"])
        opt, schedule = build(model)
        opt.load_state_dict(saved["optim"])
        schedule.load_state_dict(saved["schedule"])
        losses, _ = train(model, opt, schedule, at)
        weights = all(torch.equal(a, b) for a, b in zip(model.parameters(), straight_model.parameters()))
        if losses != expected[at:] or not weights:
            differ.append(at)
    assert not differ, f"resumed after steps {differ} differs from the straight run"


# --- through the trainer ----------------------------------------------------------------------------------

def test_trainer_galore_run_resumes_bitwise(tmp_path, tiny_config):
    from longtune.launch.cli import main

    def cfg(name, steps, resume=None):
        c = {**tiny_config, "optim": {"name": "galore_adamw", "galore": {"rank": 4, "update_proj_gap": 3}}}
        c["train"] = {**c["train"], "max_steps": steps, "schedule": "constant", "warmup_steps": 0}  # lr not tied to max_steps
        c["checkpoint"] = {"every_n_steps": 2, "keep_last": 2}
        c["run"] = {"output_dir": str(tmp_path / name), "resume": resume}
        c["data"] = {**c["data"], "passkey": {"digits": 4, "eval_samples": 0}}
        return str(write_yaml(tmp_path / f"{name}.yaml", c))

    assert main(["train", cfg("straight", 6)]) == 0
    assert main(["train", cfg("split", 4)]) == 0
    assert main(["resume", str(tmp_path / "split"), "train.max_steps=6"]) == 0
    straight, split = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert straight == split and sorted(straight) == list(range(1, 7))
    # A resume that changes what shapes the optimizer's state is refused before anything loads.
    assert main(["resume", str(tmp_path / "split"), "train.max_steps=8", "optim.galore.rank=8"]) == 2


def test_trainer_galore_resume_from_a_checkpoint_under_a_warmup_and_decay_is_bitwise(tmp_path, tiny_config):
    """The issue's case through the trainer: a cosine schedule with warmup (the rate changes every step), resumed
    from a copy of the run at step 2. Before the fix the resumed run kept the rate the scheduler set when it was
    built (0: the warmup's start), so its weights never moved again and step 4's loss differed."""
    import shutil

    from longtune.launch.cli import main

    c = {**tiny_config, "optim": {"name": "galore_adamw", "galore": {"rank": 4, "update_proj_gap": 3}}}
    c["train"] = {**c["train"], "max_steps": 6, "schedule": "cosine", "warmup_steps": 2}
    c["checkpoint"] = {"every_n_steps": 2, "keep_last": 10}
    c["run"] = {"output_dir": str(tmp_path / "straight")}
    c["data"] = {**c["data"], "passkey": {"digits": 4, "eval_samples": 0}}
    assert main(["train", str(write_yaml(tmp_path / "straight.yaml", c))]) == 0
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    assert main(["resume", str(tmp_path / "resumed" / "step_2")]) == 0
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 7)) and resumed == straight  # steps 3..6 rewritten by the resumed run
    for step in (4, 6):
        assert (tmp_path / "straight" / f"step_{step}" / "model.safetensors").read_bytes() == \
            (tmp_path / "resumed" / f"step_{step}" / "model.safetensors").read_bytes()


# --- the planner's accounting against the optimizer's real state ------------------------------------------

@pytest.mark.parametrize("projector, rank", [("svd", 4), ("random", 4), ("svd", 1000)])
def test_planner_counts_the_state_the_optimizer_keeps(projector, rank):
    from longtune.planner.problem import GaloreSizing, ModelShape

    model = _model()
    opt = _galore(model, projector=projector, rank=rank)
    _train(model, opt, _batches(1))
    kept = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    cfg = tiny_model_config()
    cfg["vocab_size"] = 256
    shape = ModelShape.from_hf_config(cfg, "float32")
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert GaloreSizing(rank=rank, stores_basis=projector != "random").bytes(shape)["optimizer"] == kept


# --- data parallel: 2 processes (gloo), layer-wise, accumulation 4 -----------------------------------------

DP_STEPS, DP_ACCUM, DP_WORLD = 3, 4, 2


def _dp_worker(rank: int, store: str, projector: str, out: str, fsdp: bool) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=DP_WORLD)
    try:
        torch.set_num_threads(1)
        model = _model()
        if fsdp:  # FSDP2: every decoder layer and the rest sharded by rows; it averages the gradients itself
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        opt = _galore(model, projector=projector, update_proj_gap=2, on_refresh="rotate",
                      process_group=None if fsdp else dist.group.WORLD)
        opt.attach_layerwise()
        batches, losses = _batches(DP_STEPS * DP_ACCUM * DP_WORLD), []
        for step in range(DP_STEPS):
            global_batch = batches[step * DP_ACCUM * DP_WORLD:(step + 1) * DP_ACCUM * DP_WORLD]
            mine = global_batch[rank * DP_ACCUM:(rank + 1) * DP_ACCUM]
            opt.expect_backwards(DP_ACCUM)
            total = torch.zeros(())
            for ids in mine:
                loss = _loss(model, ids) / DP_ACCUM
                loss.backward()
                total += loss.detach()
            opt.clip_and_step()
            opt.zero_grad(set_to_none=True)
            dist.all_reduce(total)
            losses.append(float(total) / DP_WORLD)
        weights = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        if not fsdp:  # a DDP-style run that forgets the process group is refused, not silently per-rank
            with pytest.raises(ValueError, match="process_group"):
                _galore(_model()).attach_layerwise()
        if rank == 0:
            torch.save({"losses": losses, "weights": weights}, out)
        dist.barrier()  # no rank tears the group down while the other is still in a collective (gloo aborts)
    finally:
        dist.destroy_process_group()
    # Done, results written: skip the interpreter's teardown, where a thread left by gloo/FSDP2 aborts the
    # process now and then under load ("terminate called without an active exception": 1 fresh-clone run in 3)
    os._exit(0)


@pytest.mark.parametrize("projector, fsdp", [("svd", False), ("random", False), ("svd", True), ("randomized", True)],
                         ids=["ddp-svd", "ddp-random", "fsdp2-svd", "fsdp2-randomized"])
def test_layerwise_data_parallel_equals_one_process_with_the_global_batch(projector, fsdp, tmp_path):
    """2 processes (gloo), layer-wise, accumulation 4: data parallel by GaloreAdamW's own reduction (rank-r
    between refreshes), or under FSDP2 (row shards; a left projection's partial sums added over the ranks)."""
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.pt"
    mp.start_processes(_dp_worker, args=(str(tmp_path / "store"), projector, str(out), fsdp), nprocs=DP_WORLD,
                       start_method="spawn")
    dp = torch.load(out, weights_only=True)

    model = _model()  # one process, stepping after backward, the 8 micro-batches of each global batch
    opt = _galore(model, projector=projector, update_proj_gap=2, on_refresh="rotate")
    losses = _train(model, opt, _batches(DP_STEPS * DP_ACCUM * DP_WORLD), accum=DP_ACCUM * DP_WORLD)
    torch.testing.assert_close(torch.tensor(dp["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(dp["weights"][name], value, rtol=1e-4, atol=1e-6, msg=name)


# --- 8-bit moments -----------------------------------------------------------------------------------------

def test_eight_bit_moments_track_full_precision_at_a_quarter_of_the_bytes(monkeypatch):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    import longtune.offload.galore as galore
    from longtune.planner.problem import GaloreSizing, ModelShape

    monkeypatch.setattr(galore, "MIN_8BIT_NUMEL", 0)  # every moment in 8 bits (the tiny model's are small)
    batches = _batches(1) * 20  # one batch again and again: the loss must fall
    full_model, q_model = _model(), _model()
    full = _train(full_model, _galore(full_model, on_refresh="rotate"), batches)
    q_opt = _galore(q_model, eight_bit=True, on_refresh="rotate")
    quantized = _train(q_model, q_opt, batches)
    assert quantized[-1] < quantized[0] - 0.5  # it learns
    torch.testing.assert_close(torch.tensor(quantized), torch.tensor(full), rtol=5e-3, atol=0)  # 8-bit rounding
    assert quantized != full
    moments = [k for s in q_opt.state.values() for k in s if k.startswith("exp_avg")]
    assert moments and all(k.endswith(("_q", "_absmax")) for k in moments)
    # state bytes against the planner's count (8-bit moments, fp32 bases): within 1% (it rounds blocks)
    kept = sum(v.numel() * v.element_size() for s in q_opt.state.values() for v in s.values() if torch.is_tensor(v))
    cfg = tiny_model_config()
    cfg["vocab_size"] = 256
    counted = GaloreSizing(rank=4, eight_bit=True).bytes(ModelShape.from_hf_config(cfg, "float32"))["optimizer"]
    assert abs(kept - counted) / kept < 0.01
    # and it resumes from a weights_only checkpoint: plain uint8 and fp32 tensors
    buffer = io.BytesIO()
    torch.save(q_opt.state_dict(), buffer)
    buffer.seek(0)
    _galore(_model(), eight_bit=True).load_state_dict(torch.load(buffer, weights_only=True))


def test_the_fused_update_kernel_gives_the_optimizers_steps():
    from longtune.kernels.galore_update import galore_update

    batches = _batches(6)
    plain_model, fused_model = _model(), _model()
    plain = _train(plain_model, _galore(plain_model, update_proj_gap=3), batches)
    fused_opt = GaloreAdamW(fused_model.named_parameters(), GaloreOptions(rank=4, update_proj_gap=3, scale=0.25),
                            fused_update=galore_update, **OPTS)  # Triton (the CPU interpreter here, a GPU there)
    fused = _train(fused_model, fused_opt, batches)
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(fused_model.named_parameters(), plain_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


# --- moments on the host -----------------------------------------------------------------------------------

def test_moments_on_the_host_train_as_on_the_device_and_the_plan_counts_them(tmp_path, tiny_config):
    from longtune.launch.cli import main
    from longtune.planner.problem import GaloreSizing, ModelShape, state_options
    from longtune.trainer.capacities import load_machine

    def run(name, where):
        c = {**tiny_config, "optim": {"name": "galore_adamw", "galore": {"rank": 4, "update_proj_gap": 2}}}
        c["train"] = {**c["train"], "max_steps": 4}
        c["memory"] = {"optimizer": where}
        c["run"] = {"output_dir": str(tmp_path / name)}
        c["data"] = {**c["data"], "passkey": {"digits": 4, "eval_samples": 0}}
        assert main(["train", str(write_yaml(tmp_path / f"{name}.yaml", c))]) == 0
        return train_losses(tmp_path / name)

    assert run("host", "cpu") == run("device", "gpu")  # on this CPU machine the same arithmetic, bit for bit
    model = _model()
    opt = GaloreAdamW(model.named_parameters(), GaloreOptions(rank=4), state_device=torch.device("cpu"), **OPTS)
    _train(model, opt, _batches(1))
    moments = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k.startswith("exp_avg"))
    cfg = tiny_model_config()
    cfg["vocab_size"] = 256
    shape = ModelShape.from_hf_config(cfg, "float32")
    option = state_options(shape, load_machine("h100-pcie5"), 1e-3, "cpu", "gpu", GaloreSizing(rank=4))[0]
    assert option.tier_bytes["host"] == moments
    assert option.gpu_bytes["optimizer"] == sum(s["basis"].numel() * 4 for s in opt.state.values() if "basis" in s)


def test_trainer_layerwise_and_with_an_activation_plan_give_the_same_losses(tmp_path, tiny_config, capsys):
    from longtune.launch.cli import main

    def run(name, layerwise, memory):
        c = {**tiny_config, "memory": memory, "run": {"output_dir": str(tmp_path / name)},
             "optim": {"name": "galore_adamw", "galore": {"rank": 4, "update_proj_gap": 2, "layerwise": layerwise}}}
        c["train"] = {**c["train"], "max_steps": 3, "grad_accum_steps": 2, "clip_grad_norm": None}
        c["data"] = {**c["data"], "seq_len": 256, "passkey": {"digits": 4, "eval_samples": 0}}
        assert main(["train", str(write_yaml(tmp_path / f"{name}.yaml", c))]) == 0
        return [train_losses(tmp_path / name)[s] for s in (1, 2, 3)]

    after_backward = run("after-backward", False, {})
    layerwise = run("layerwise", True, {})
    planned = run("planned", True, {"budget_gb": 0.21, "plan_chunks": 2})  # the activation runtime under it
    torch.testing.assert_close(torch.tensor(layerwise), torch.tensor(after_backward), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(planned), torch.tensor(after_backward), rtol=1e-6, atol=0)
    assert "lr_scheduler.step()" not in capsys.readouterr().err  # the scheduler sees the optimizer's steps


@pytest.mark.gpu
def test_host_moments_stay_on_the_host_after_a_resume():
    """memory.optimizer=cpu keeps GaLore's moments on the host; torch's load_state_dict moves every state tensor to
    its parameter's device, so a resumed run would step GPU moments with host gradients. They go back to the host
    (pinned), and the resumed steps equal the straight ones."""
    model = _model().cuda()
    opt = GaloreAdamW(model.named_parameters(), GaloreOptions(rank=4, update_proj_gap=5, scale=0.25),
                      state_device=torch.device("cpu"), **OPTS)
    batches = [b.cuda() for b in _batches(5)]
    _train(model, opt, batches[:2])
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optim": opt.state_dict()}
    expected = _train(model, opt, batches[2:])
    model.load_state_dict(saved["model"])
    resumed = GaloreAdamW(model.named_parameters(), GaloreOptions(rank=4, update_proj_gap=5, scale=0.25),
                          state_device=torch.device("cpu"), **OPTS)
    resumed.load_state_dict(saved["optim"])
    moments = [t for s in resumed.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(t.device.type == "cpu" and t.is_pinned() for t in moments)
    assert _train(model, resumed, batches[2:]) == expected


def test_eight_bit_moments_step_a_bf16_model(monkeypatch):
    """8-bit moments are dequantised to fp32 for the step; the update goes back to the weights' dtype before it is
    projected back (a bf16 model's first step raised "expected m1 and m2 to have the same dtype" before)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    import longtune.offload.galore as galore

    monkeypatch.setattr(galore, "MIN_8BIT_NUMEL", 0)
    model = _model().to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = _train(model, _galore(model, eight_bit=True), _batches(3))
    assert all(math.isfinite(x) for x in losses)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
