"""Optimizer state and weights off the GPU give the losses and weights of the all-in-memory run, bit for bit.

The in-memory run uses torch's fused AdamW; the offloaded optimizer runs the
same fused kernel on the host (`offload/cpu_adam.py`, torch backend), so in
fp32 every step is the same arithmetic and the results are bitwise equal.
"""

from __future__ import annotations

import copy
import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import budget_gb_placing, make_tiny_config, plan_budget_gb, read_metrics, run_cli, train_losses, write_yaml
from safetensors.torch import load_file

from longtune.offload.cpu_adam import deepspeed_cpu_adam_built as cpu_adam_built
from longtune.offload.nvme import NvmeError, aio_is_built
from longtune.planner.plan import Plan
from longtune.trainer.checkpoint import latest_complete, load_checkpoint
from longtune.trainer.config import ConfigError, validate
from longtune.trainer.model import build_model
from longtune.trainer.train import train

PLACEMENTS = {
    "optimizer on host": {"optimizer": "cpu", "cpu_adam": "torch"},
    "optimizer on nvme": {"optimizer": "nvme", "cpu_adam": "torch"},
    "weights streamed from host": {"optimizer": "cpu", "params": "cpu", "cpu_adam": "torch"},
    "all on nvme": {"optimizer": "nvme", "params": "nvme", "cpu_adam": "torch"},
}


def _run(base: dict, tmp_path, name: str, memory: dict | None = None, runs: Path | None = None,
         **sections) -> tuple[dict, dict]:
    """(losses, final weights) of `base` with `memory` and `sections` on top; NVMe files under tmp_path, the run
    folder under `runs` (tmp_path when not given). A run with checkpoint.save_final=false gives its losses alone."""
    cfg = copy.deepcopy(base)
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    cfg["memory"] = {**cfg.get("memory", {}), **(memory or {})}
    if "nvme" in (cfg["memory"].get("optimizer"), cfg["memory"].get("params")):
        cfg["memory"]["nvme_path"] = str(tmp_path / f"{name}-nvme")
    cfg["run"]["output_dir"] = str((runs or tmp_path) / name)
    result = train(validate(cfg))
    if cfg["checkpoint"].get("save_final", True) is False and not cfg["checkpoint"].get("every_n_steps"):
        return train_losses(result.output_dir), {}
    weights = load_file(str(latest_complete(result.output_dir) / "model.safetensors"))
    return train_losses(result.output_dir), weights


def _assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert a[0] == b[0]  # losses, exactly
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


def _offload_config(tiny: dict) -> dict:
    cfg = copy.deepcopy(tiny)
    cfg["train"].update(max_steps=5, grad_accum_steps=2)
    cfg["optim"] = {"weight_decay": 0.1}
    cfg["data"]["passkey"]["eval_samples"] = 0
    return cfg


@pytest.fixture
def offload_config(tiny_config) -> dict:
    return _offload_config(tiny_config)


# The in-memory run of offload_config, trained once for the module: the reference of every placement below and
# the uninterrupted run the tier-moving resume is checked against (so it keeps step_2 and step_4 as well; a
# checkpoint write changes nothing the run computes, and the final weights are read from the last one, step_5).
PLAIN_CHECKPOINTS = {"every_n_steps": 2, "keep_last": 5}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tokenizer_dir) -> tuple[dict, dict, Path]:
    """(losses, final weights, run folder) of offload_config's in-memory run."""
    tmp = tmp_path_factory.mktemp("offload-plain")
    cfg = _offload_config(make_tiny_config(tmp / "unused", tokenizer_dir))
    losses, weights = _run(cfg, tmp, "plain", checkpoint=PLAIN_CHECKPOINTS)
    return losses, weights, tmp / "plain"


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_offloaded_run_equals_in_memory_run_bitwise(tmp_path, offload_config, placement, plain_run):
    plain = plain_run[:2]
    _assert_same(_run(offload_config, tmp_path, "offloaded", PLACEMENTS[placement]), plain)
    # Every step's traffic is logged: each micro-batch's gradients leave the device during its backward
    # (fp32 here); updated weights go back as each layer's update lands, which may be in the next step.
    steps = [m for m in read_metrics(tmp_path / "offloaded") if "loss" in m]
    n_params = sum(w.numel() for w in plain[1].values())
    assert [m["to_host_gb"] * 1e9 for m in steps] == pytest.approx([2 * 4 * n_params] * 5, rel=1e-12)
    assert sum(m["to_device_gb"] for m in steps) * 1e9 >= 4 * 4 * n_params
    on_nvme = "nvme" in PLACEMENTS[placement].values()
    assert all(("nvme_read_gb" in m) == on_nvme for m in steps)
    assert sum(m.get("nvme_read_gb", 0) for m in steps) * 1e9 >= (4 * 3 * 4 * n_params if on_nvme else 0)


@pytest.mark.parametrize("clip", [1.0, None])
def test_streamed_weights_with_gradient_checkpointing_and_clipping(tmp_path, offload_config, clip):
    """Recomputation fetches the layer again; without clipping the steps run during backward."""
    memory = {"gradient_checkpointing": True}
    plain = _run(offload_config, tmp_path, "plain", memory, train={"clip_grad_norm": clip})
    streamed = _run(offload_config, tmp_path, "streamed", {**memory, **PLACEMENTS["weights streamed from host"]},
                    train={"clip_grad_norm": clip})
    _assert_same(streamed, plain)


def test_resume_moves_optimizer_state_between_tiers(tmp_path, offload_config, plain_run):
    """Checkpoints hold torch AdamW's state format: a run saved on the GPU tier resumes on NVMe, exactly."""
    straight, straight_dir = plain_run[:2], plain_run[2]  # saved at steps 2, 4 and 5
    resumed = _run(offload_config, tmp_path, "resumed", PLACEMENTS["all on nvme"],
                   run={"resume": str(straight_dir / "step_2")})
    assert resumed[0] == {k: v for k, v in straight[0].items() if k > 2}
    _assert_same(({}, resumed[1]), ({}, straight[1]))


def test_streamer_keeps_few_layers_on_the_device(tiny_config):
    from longtune.offload.dispatch import SavedTensorDispatcher, _ParamHandle
    from longtune.offload.params import ParamStreamer

    cfg = copy.deepcopy(tiny_config)
    cfg["model"]["config"]["num_hidden_layers"] = 6
    model = build_model(validate(cfg).model)
    streamer = ParamStreamer(model, torch.device("cpu"))
    dispatcher = SavedTensorDispatcher()  # the memory runtime's one saved-tensor hook, the streamer plugged in
    dispatcher.params = streamer
    resident, packed = [], []
    pack = dispatcher._pack
    dispatcher._pack = lambda t: packed.append(pack(t)) or packed[-1]
    for layer in streamer.layers:
        layer.module.register_forward_hook(lambda *a: resident.append(len(streamer._resident)))
    ids = torch.randint(0, 1000, (1, 16))
    with dispatcher.hooks():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert max(resident) <= 2  # the layer in use and the one prefetched
    assert any(isinstance(p, _ParamHandle) for p in packed)  # saved weight views went out as handles
    assert len(streamer._resident) == 0  # every layer freed once its gradients were in
    # Each layer once for forward and once for backward, except the last, which backward starts with.
    layer_bytes = sum(streamer._nbytes.values())
    assert streamer.bytes_fetched == 2 * layer_bytes - streamer._nbytes[streamer._last]
    assert all(p.grad is not None and p.grad.shape == s for g in streamer.layers for p, s in zip(g.params, g.shapes))
    streamer.close()


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_streamed_weights_are_exact_when_copies_lag_and_the_host_never_waits_for_one(tiny_config, tier, tmp_path):
    """The streamer's copies go through the runtime's mover: compute waits for a layer's weights, the host does
    not (it used to block on the whole copy stream every layer, activation prefetches included). Under the
    lagging-device mode a copy runs only when someone waits for it: with the weights in host RAM, each one is
    still queued when compute comes to need it (nothing on the host forced it), and the gradients are the
    plain model's. (From NVMe, the fetcher thread waits for the copy out of the one staging buffer before it
    reads the next layer into it.)"""
    from longtune.offload.dispatch import SavedTensorDispatcher
    from longtune.offload.movers import Mover
    from longtune.offload.nvme import NvmeStore
    from longtune.offload.params import ParamStreamer

    cfg = copy.deepcopy(tiny_config)
    cfg["model"]["config"]["num_hidden_layers"] = 4
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = build_model(validate(cfg).model)
    plain(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    torch.manual_seed(0)
    model = build_model(validate(cfg).model)
    mover = Mover(torch.device("cpu"), "h2d", lagging=True)
    store = NvmeStore(str(tmp_path / "nvme")) if tier == "nvme" else None
    streamer = ParamStreamer(model, torch.device("cpu"), tier=tier, nvme_store=store, mover=mover)
    dispatcher = SavedTensorDispatcher()
    dispatcher.params = streamer
    pending, wait = [], mover.wait
    mover.wait = lambda ticket: pending.append(not ticket.future.done()) or wait(ticket)
    with dispatcher.hooks():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert len(pending) == 2 * 4 - 1  # every layer fetched for forward and backward, but the last
    if tier == "cpu":
        assert all(pending), pending
    grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name
    streamer.close()
    mover.close()
    if store is not None:
        store.close()


def test_nvme_write_failure_mid_run_is_clear_and_keeps_the_last_checkpoint(tmp_path, offload_config, monkeypatch):
    """ENOSPC injected into the NVMe tier's pwrite at step 4: one clear error; step_2 still loads and resumes."""
    import longtune.offload.nvme as nvme

    cfg = copy.deepcopy(offload_config)
    cfg["train"]["max_steps"] = 6
    cfg["checkpoint"]["every_n_steps"] = 2
    # The portable thread-pool I/O path, where the ENOSPC is injected (aio goes through libaio instead).
    cfg["memory"] = {**PLACEMENTS["optimizer on nvme"], "nvme_path": str(tmp_path / "nvme"), "nvme_backend": "threads"}
    cfg["run"]["output_dir"] = str(tmp_path / "run")
    real_pwrite = os.pwrite

    def failing_pwrite(fd, data, offset):
        from conftest import train_losses as losses

        if (tmp_path / "run" / "metrics.jsonl").exists() and 3 in losses(tmp_path / "run"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(nvme.os, "pwrite", failing_pwrite)
    with pytest.raises(NvmeError, match="disk full"):
        train(validate(cfg))
    assert latest_complete(tmp_path / "run").name == "step_2"
    assert not list((tmp_path / "nvme").glob("**/*"))  # scratch removed at exit, even after the failure
    monkeypatch.setattr(nvme.os, "pwrite", real_pwrite)
    model = build_model(validate(cfg).model)
    load_checkpoint(tmp_path / "run" / "step_2", model, restore_rng=False)
    cfg["run"]["resume"] = "auto"
    resumed = train(validate(cfg))
    straight = _run(offload_config, tmp_path, "straight", train={"max_steps": 6})
    assert train_losses(resumed.output_dir)[6] == straight[0][6]


def test_tier_too_small_says_how_much_is_missing(tmp_path, offload_config):
    cfg = copy.deepcopy(offload_config)
    cfg["memory"] = {"optimizer": "cpu", "tiers": {"host_gb": 0.001}}
    cfg["run"]["output_dir"] = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"needs 0\.\d GB on the host tier, which holds 0\.0 GB: 0\.\d GB missing"):
        train(validate(cfg))


def test_params_off_the_gpu_need_the_optimizer_off_too(tmp_path, offload_config):
    cfg = write_yaml(tmp_path / "c.yaml", {**offload_config, "memory": {"params": "cpu"}})
    result = run_cli("train", cfg)
    assert result.returncode == 2
    assert "memory.params=cpu needs the optimizer off the GPU too" in result.stderr


# The real model's runs: two steps without warmup, each one moving the weights (the second reads the optimizer
# state the first wrote to its tier), at a sequence just long enough for the passkey
# prompt (89 tokens). A step of the real model is most of each run's time.
SMOLLM2_STEPS = 2


@pytest.mark.slow
def test_smollm2_offloaded_equal_in_memory(tmp_path, smollm2_dir, ram_dir):
    """The real model: optimizer on host, on NVMe, weights streamed from host; a tight activation plan."""
    cfg = {
        "model": {"path": str(smollm2_dir)},
        "data": {"kind": "passkey", "seq_len": 96, "passkey": {"digits": 3, "eval_samples": 0}},
        "train": {"max_steps": SMOLLM2_STEPS, "lr": 1e-4, "warmup_steps": 0, "seed": 0},
        "checkpoint": {"every_n_steps": 0},
        "run": {"output_dir": str(tmp_path / "run")},  # each _run sets its own
        "log": {"sinks": ["jsonl"]},
    }
    def run(name: str, memory: dict | None = None) -> tuple[dict, dict]:
        """A run's losses and final weights; its folder (a 1.5 GB checkpoint) and NVMe files go once read."""
        result = _run(cfg, tmp_path, name, memory, runs=ram_dir)
        for folder in (ram_dir / name, tmp_path / f"{name}-nvme"):
            shutil.rmtree(folder, ignore_errors=True)
        return result

    plain = run("plain")
    assert len(plain[0]) == SMOLLM2_STEPS
    # Two runs cover the three placements: the optimizer's tier (host or NVMe) and where the weights live (on the
    # device, or streamed from host, the optimizer writing each update to their home) are independent parts of
    # the runtime (offload/runtime.py `_offload_state`); the tiny model above runs each placement on its own.
    placements = {"optimizer on host": PLACEMENTS["optimizer on host"],
                  "optimizer on nvme, weights streamed from host": {"optimizer": "nvme", "params": "cpu",
                                                                    "cpu_adam": "torch"}}
    for placement, memory in placements.items():
        _assert_same(run(placement.replace(" ", "-").replace(",", ""), memory), plain)
    # A tight activation plan (offload + recompute, beside the optimizer on the host): the plain run's losses to
    # fp32 rounding (the weight gradients are summed chunk by chunk, so not bit for bit). Only its losses and plan
    # are read: it writes no checkpoint.
    # (a drive for the plan as budget_gb_placing plans it: with the host alone at 96 tokens it recomputes only)
    memory = {**PLACEMENTS["optimizer on host"], "plan_chunks": 4, "nvme_path": str(tmp_path / "planned-nvme")}
    budget = budget_gb_placing({**cfg, "memory": memory}, {"host", "recompute"})
    planned = _run(cfg, tmp_path, "planned", {**memory, "budget_gb": budget}, checkpoint={"save_final": False})
    assert not list((tmp_path / "planned").glob("step_*"))
    places = {p for layer in Plan.from_yaml((tmp_path / "planned" / "plan.yaml").read_text()).layers
              for d in layer.values() for p in d}
    assert {"host", "recompute"} <= places
    for step, loss in plain[0].items():
        assert planned[0][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def test_cxl_machine_puts_optimizer_state_local_and_weights_on_cxl(tmp_path, offload_config, monkeypatch):
    """The trainer's pools follow the CXL-aware policy on a (fake sysfs) machine with a CXL node."""
    from types import SimpleNamespace

    import longtune.offload.numa as numa
    from longtune.trainer.memory import _numa_placement

    root = tmp_path / "node"
    for node, cpus, gib in ((0, "0-15", 64), (1, "", 256)):
        d = root / f"node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
        kb = gib * 1024 * 1024
        (d / "meminfo").write_text(f"Node {node} MemTotal:       {kb} kB\nNode {node} MemFree:        {kb} kB\n")
        (d / "distance").write_text("10 20\n" if node == 0 else "20 10\n")
    (root / "online").write_text("0-1\n")
    (root / "has_memory").write_text("0-1\n")
    real = numa.read_nodes
    monkeypatch.setattr(numa, "read_nodes", lambda: real(root))
    cfg = validate({**offload_config, "memory": {"optimizer": "cpu", "params": "cpu", "tiers": {"host_gb": 100}}})
    plan = SimpleNamespace(optimizer_tier="cpu", params_tier="cpu", problem=SimpleNamespace(offload_activations=True))
    # 80 GB of fp32 state, 10 GB of bf16 weights
    optimizer, weights, activations, notes = _numa_placement(cfg, plan, 5_000_000_000, 2)
    assert optimizer == {"numa_nodes": [0], "interleave": False}
    assert weights == {"numa_nodes": [1], "interleave": False}
    assert activations == {"host": {"numa_nodes": [0]}, "cxl": {"numa_nodes": [1], "interleave": False}}
    assert any("weights pool on NUMA nodes [1]" in n for n in notes)
    optimizer, *_ = _numa_placement(cfg, plan, 10_000_000_000, 2)  # 160 GB of state straddles 100 GB
    assert optimizer == {"numa_nodes": [0, 1], "interleave": True}
    # 320 GB of state, 100 GB local: below an even split, so the pool binds its head interleaved and its tail to
    # CXL (placement_ranges), the split the policy documents
    optimizer, *_ = _numa_placement(cfg, plan, 20_000_000_000, 2)
    assert optimizer["numa_nodes"] == [0, 1] and optimizer["numa_local_share"] == pytest.approx(100 / 320, rel=0.01)


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.skipif(not (cpu_adam_built() and aio_is_built()),
                    reason="DeepSpeed's cpu_adam and async_io ops are not built; tests never spend minutes compiling them")
def test_deepspeed_ops_in_the_trainer(tmp_path, offload_config):
    """DeepSpeed's libaio NVMe op moves the same bytes (bitwise); its CPU Adam differs from torch's kernel
    only in rounding (fp32 bias corrections, FMAs): losses and weights within 1e-6 relative (2e-7 measured)."""
    plain = _run(offload_config, tmp_path, "plain")
    aio = _run(offload_config, tmp_path, "aio", {**PLACEMENTS["all on nvme"], "nvme_backend": "aio"})
    _assert_same(aio, plain)
    ds = _run(offload_config, tmp_path, "ds", {"optimizer": "cpu", "cpu_adam": "deepspeed"})
    assert ds[0].keys() == plain[0].keys()
    assert max(_relative(ds[0][k], plain[0][k]) for k in plain[0]) <= 1e-6
    for name, w in plain[1].items():
        assert ((ds[1][name] - w).abs().max() / w.abs().max()).item() <= 1e-6, name


def test_on_a_cpu_device_the_update_runs_on_the_training_thread_and_equals_the_worker_threads():
    """A CPU device's cores would run the host update beside the compute (two OpenMP teams on two cores: 1.5 s
    more a step, SmolLM2 at 2,048 tokens), so the runtime runs it inline there (offload/runtime.py; the
    lagging-device mode keeps the worker, as on a GPU). Inline and on the worker, the weights come out bit for bit
    the same, and inline the update's time is time the training thread was blocked (`offload_wait_s`)."""
    import threading

    from transformers import LlamaConfig, LlamaForCausalLM

    from longtune.offload.optimizer import OffloadedAdamW
    from conftest import tiny_model_config

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in tiny_model_config().items() if k != "model_type"}))
    ids = torch.randint(0, 1000, (1, 32))
    weights = {}
    for inline in (True, False):
        model = copy.deepcopy(base)
        before = {t.name for t in threading.enumerate()}
        opt = OffloadedAdamW(model, lr=1e-2, weight_decay=0.1, clip_grad_norm=1.0, device=torch.device("cpu"),
                             inline=inline)
        for _ in range(2):
            opt.expect_backwards(1)
            model(ids, labels=ids).loss.backward()
            opt.clip_and_step()
        opt.synchronize()
        workers = {t.name for t in threading.enumerate()} - before
        assert any(n.startswith("longtune-adam") for n in workers) != inline
        if inline:
            assert opt.wait_s > 0
        weights[inline] = {k: v.clone() for k, v in model.state_dict().items()}
        opt.close()
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])
    assert not all(torch.equal(weights[True][k], base.state_dict()[k]) for k in weights[True])
