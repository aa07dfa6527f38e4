"""Multi-process training through torchrun, 2 processes on gloo: every strategy gives the single-process run's
losses with the same global batch, a lost rank is survived, and an FSDP2 run resumes on another world size.

The reference is one process with train.grad_accum_steps=2: the same 2 sequences per step as 2 ranks with one
each (the data loader gives rank r the r-th micro-batch of each global one). What may differ is the order of
the fp32 sums: the all-reduce adds the two ranks' gradients where one process accumulates them, and the loss
is scaled by the world size (x2, /2: exact). Tolerance 2e-6 relative on the loss of every step (a few fp32 ulps
over 10 steps; DDP within 1e-7 here, and ZeRO-2 equal to DDP on this model),
1e-4 on the gradient norm (FSDP2 sums the squared norms of the shards, then over the ranks; DeepSpeed computes
the norm in fp64, torch's clip_grad_norm_ in fp32, ~1e-5 apart here). DeepSpeed clips by its own norm, so a ZeRO
run matches DDP bit for bit only where no step clips (test_zero2_is_ddp_bit_for_bit_where_no_step_clips); after a
clipped step its losses are as close as the training keeps a ~1e-5 change of that step's clip factor
(docs/parallelism.md: identical on this model, up to 1e-4 relative on SmolLM2-135M's losses near 1e-4).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import yaml
import pytest

from conftest import make_tiny_config, read_metrics, run_cli, start_cli, train_losses, write_yaml

STEPS = 10
LOSS_RTOL, NORM_RTOL = 2e-6, 1e-4


def _config(tiny_config: dict, out: Path, **train) -> dict:
    cfg = tiny_config
    cfg["train"].update(max_steps=STEPS, warmup_steps=2, **train)
    cfg["data"]["passkey"]["eval_samples"] = 0
    cfg["checkpoint"].update(every_n_steps=4, keep_last=3)
    cfg["run"].update(output_dir=str(out), device="cpu")  # gloo, on a GPU machine too (fewer GPUs than ranks)
    return cfg


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_dir) -> dict[int, dict]:
    """One process, two micro-batches per step: step -> metrics record. Trained in this process, without a CLI
    start-up: only its metrics are used."""
    from longtune.trainer.config import validate
    from longtune.trainer.train import train

    out = tmp_path_factory.mktemp("reference") / "run"
    cfg = _config(make_tiny_config(out, tokenizer_dir), out, grad_accum_steps=2)
    assert train(validate(cfg)).step == STEPS
    return {m["step"]: m for m in read_metrics(out) if "loss" in m}


def _assert_matches(reference: dict[int, dict], run: Path, steps=range(1, STEPS + 1)) -> None:
    got = {m["step"]: m for m in read_metrics(run) if "loss" in m}
    for step in steps:
        assert got[step]["loss"] == pytest.approx(reference[step]["loss"], rel=LOSS_RTOL), step
        assert got[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=NORM_RTOL), step


STRATEGIES = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp2": ["parallel.strategy=fsdp2"],
    "zero2": ["parallel.strategy=deepspeed", "parallel.zero_stage=2"],
    "zero3-offload": ["parallel.strategy=deepspeed", "parallel.zero_stage=3", "parallel.offload_optimizer=cpu",
                      "parallel.offload_params=cpu"],
    # sequence parallel 2: both ranks share each sequence (data parallel 1), so two micro-batches a step give the
    # reference's global batch; attention through the registered Ulysses attention (no activation plan)
    "fsdp2-sp2": ["parallel.strategy=fsdp2", "parallel.sequence_parallel=2", "train.grad_accum_steps=2"],
    "zero3-sp2": ["parallel.strategy=deepspeed", "parallel.zero_stage=3", "parallel.sequence_parallel=2",
                  "train.grad_accum_steps=2"],
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_two_ranks_match_one_process(name, reference, tmp_path, tiny_config):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "c.yaml", _config(tiny_config, out))
    result = run_cli("train", cfg, "--nproc", "2", *STRATEGIES[name])
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_matches(reference, out)
    strategy = STRATEGIES[name][0].split("=")[1]
    assert f"[rank 0] 2 processes, parallel.strategy={strategy}" in result.stdout
    assert "[rank 1]" not in result.stdout, "only rank 0 prints progress"
    assert "is deprecated" not in result.stderr and "[INFO]" not in result.stdout + result.stderr
    assert len(train_losses(out)) == STEPS  # one writer of metrics.jsonl
    step = out / f"step_{STEPS}"
    assert (step / "COMPLETE").is_file() and (step / "rng_rank1.pt").is_file()
    if strategy != "ddp":  # sharded: no full weights file
        assert not (step / "model.safetensors").exists()
    if name.endswith("sp2"):
        assert "1 x sequence parallel 2" in result.stdout
        tokens = {m["step"]: m["tokens_seen"] for m in read_metrics(out) if "loss" in m}
        assert tokens[STEPS] == reference[STEPS]["tokens_seen"]  # the global sequences, counted once
    if strategy == "fsdp2":
        assert sorted(p.name for p in (step / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        # 2 -> 1: one process resumes the 2-rank run from step 4 through DCP, with 2 micro-batches per step for
        # the same global batch, and continues exactly as the reference did
        unsplit = ["parallel.sequence_parallel=1"] if name.endswith("sp2") else []  # one process holds it all
        resumed = run_cli("resume", out / "step_4", "train.grad_accum_steps=2", *unsplit)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming a run of 2 process(es) on 1" in resumed.stdout
        _assert_matches(reference, out, steps=range(5, STEPS + 1))
    if strategy == "deepspeed":
        assert len(list((step / "deepspeed" / "zero").glob("*optim_states.pt"))) == 2
    if name == "zero3-offload":
        refused = run_cli("resume", out / "step_4")  # one process: ZeRO cannot repartition
        assert refused.returncode == 2
        assert "written by 2 DeepSpeed ZeRO ranks and this run has 1" in refused.stderr
        resumed = run_cli("resume", out / "step_4", "--nproc", "2")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        _assert_matches(reference, out, steps=range(5, STEPS + 1))
    if name in ("fsdp2", "zero3-offload"):  # a plain transformers folder from the sharded checkpoint
        # `longtune export` through the CLI's main in this process, which loads the checkpoint below anyway: no
        # start-up of its own (an export in its own process: test_export.py, test_adapters.py)
        from longtune.launch.cli import main

        assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
        _assert_exported_is_trained(tmp_path / "hf", step)


def test_zero2_is_ddp_bit_for_bit_where_no_step_clips(tmp_path, tokenizer_dir):
    """Where ZeRO and DDP part (docs/parallelism.md, Exactness): gradient clipping. DeepSpeed computes the norm it
    clips by in fp64; torch's clip_grad_norm_ (one process, DDP, FSDP2) in fp32, on the CPU ~1e-5 off for a gradient
    of a million elements, so a step that clips scales the gradient by factors that differ that much (the norms
    reported in test_two_ranks_match_one_process: 7e-6 to 1.1e-5 apart). Without clipping the rest is the same
    arithmetic on 2 ranks (one fp32 sum of the two gradients, torch's AdamW on whole tensors or on partitions):
    every loss, and the weights after the last step, equal bit for bit. Both runs are launched at once."""
    import torch
    from safetensors.torch import load_file

    from longtune.trainer.deepspeed_files import safe_globals

    procs, runs = {}, {}
    try:
        for name in ("ddp", "zero2"):
            out = tmp_path / name / "run"
            cfg = _config(make_tiny_config(out, tokenizer_dir), out, clip_grad_norm=None)
            cfg["train"]["max_steps"] = 4
            out.parent.mkdir()
            logs = [open(out.parent / f, "w") for f in ("stdout", "stderr")]
            with logs[0], logs[1]:
                procs[name] = start_cli("train", write_yaml(out.parent / "c.yaml", cfg), "--nproc", "2",
                                        *STRATEGIES[name], stdout=logs[0], stderr=logs[1])
            runs[name] = out
        for name, proc in procs.items():
            assert proc.wait(timeout=600) == 0, (runs[name].parent / "stderr").read_text()[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ddp, zero2 = train_losses(runs["ddp"]), train_losses(runs["zero2"])
    assert ddp == zero2 and sorted(ddp) == [1, 2, 3, 4], (ddp, zero2)
    weights = load_file(runs["ddp"] / "step_4" / "model.safetensors")
    with torch.serialization.safe_globals(safe_globals()):
        (states,) = (runs["zero2"] / "step_4" / "deepspeed").glob("*/mp_rank_00_model_states.pt")
        zero_weights = torch.load(states, weights_only=True, map_location="cpu")["module"]
    assert weights.keys() == zero_weights.keys()
    for key, w in weights.items():
        assert torch.equal(w, zero_weights[key]), (key, (w - zero_weights[key]).abs().max())


def test_one_rank_under_torchrun_joins_the_agents_store(tmp_path, tiny_config):
    """`--nproc 1` with a strategy that needs a process group (FSDP2): the rank joins torchrun's group. It used to
    move MASTER_PORT to a private port while torchrun's agent store served the old one, and waited out
    parallel.timeout_s for a store nobody served (then failed with 40 lines of C++ frames)."""
    out = tmp_path / "run"
    cfg = _config(tiny_config, out)
    cfg["train"]["max_steps"] = 2
    result = run_cli("train", write_yaml(tmp_path / "c.yaml", cfg), "--nproc", "1", "parallel.strategy=fsdp2",
                     "parallel.timeout_s=20", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(train_losses(out)) == 2


def test_ranks_die_with_their_launcher(tmp_path, tiny_config):
    """SIGKILL of `longtune train --nproc 2` (an out-of-memory killer, a scheduler) ends its ranks too; they used
    to be reparented to PID 1 and train to the end, writing checkpoints with no parent."""
    out = tmp_path / "run"
    cfg = _config(tiny_config, out)
    cfg["train"]["max_steps"] = 100_000
    proc = start_cli("train", write_yaml(tmp_path / "c.yaml", cfg), "--nproc", "2")
    ranks = []
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.5)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "longtune.launch.torchrun" in " ".join(p.cmdline())]
        assert len(ranks) == 2
        proc.send_signal(signal.SIGKILL)
        gone, alive = psutil.wait_procs(ranks, timeout=20)
        assert not alive, [p.pid for p in alive]
    finally:
        for p in [proc, *ranks]:  # orphans would hold the pipes open (and train on)
            try:
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        proc.communicate()


LORA = ["adapter.kind=lora", "adapter.rank=4", "train.lr=3e-3"]
QLORA = ["adapter.kind=qlora", *LORA[1:]]  # the same adapters over the base's decoder-layer projections in 4-bit NF4
SAVED = ["adapter.modules_to_save=[lm_head,input_layernorm]"]  # trained in full beside LoRA's adapters (not QLoRA's)
LORA_STEPS = 4  # updates at steps 2 to 4: B first (it starts at zero), then A as well


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tokenizer_dir) -> dict[str, tuple[Path, int, str]]:
    """LoRA adapters with the LM head and the layers' first norms trained in full beside them (modules_to_save) in one
    process with two micro-batches per step ("one", the reference), and on 2 ranks under DDP and under FSDP2; QLoRA's the same in one process ("qlora-one") and under DDP ("qlora-ddp"): name -> (run folder,
    exit code, stderr). They are launched at once: a launch keeps about one core busy on average (its start-up is
    mostly one process at a time), so on 2 cores they overlap."""
    commands = {"one": ["train.grad_accum_steps=2", *LORA, *SAVED],
                **{s: ["--nproc", "2", f"parallel.strategy={s}", *LORA, *SAVED] for s in ("ddp", "fsdp2")},
                "qlora-one": ["train.grad_accum_steps=2", *QLORA],
                "qlora-ddp": ["--nproc", "2", "parallel.strategy=ddp", *QLORA]}
    runs, launches = {}, {}
    for name, args in commands.items():
        out = runs[name] = tmp_path_factory.mktemp(f"lora-{name}") / "run"
        cfg = _config(make_tiny_config(out, tokenizer_dir), out)
        cfg["train"]["max_steps"] = LORA_STEPS
        launches[name] = ["train", write_yaml(out.parent / "c.yaml", cfg), *args]
    done = _together(launches, tmp_path_factory.mktemp("lora-logs"))
    return {name: (out, *done[name]) for name, out in runs.items()}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "qlora-ddp"])
def test_lora_on_two_ranks_matches_one_process(strategy, lora_runs):
    """LoRA adapters and saved modules under DDP and FSDP2 (frozen base weights beside trained adapters and trained
    copies of the LM head and norms), and QLoRA's adapters under DDP (each rank quantizes the same base; the adapters'
    gradients are all-reduced), give one process's losses with the same global batch; each checkpoint holds what
    trains only (DDP), or its shards (FSDP2)."""
    one, returncode, stderr = lora_runs["qlora-one" if strategy.startswith("qlora") else "one"]
    assert returncode == 0, stderr[-3000:]
    out, returncode, stderr = lora_runs[strategy]
    assert returncode == 0, stderr[-3000:]
    _assert_matches({m["step"]: m for m in read_metrics(one) if "loss" in m}, out, steps=range(1, LORA_STEPS + 1))
    saved = 0 if strategy.startswith("qlora") else 3  # the head's copy, 2 layers' norm
    if strategy.endswith("ddp"):
        from safetensors import safe_open

        with safe_open(out / f"step_{LORA_STEPS}" / "adapter.safetensors", "pt") as f:
            keys = list(f.keys())
    else:  # the shards of what trains and its optimizer state, not of the frozen base (rebuilt from model.*)
        from torch.distributed.checkpoint import FileSystemReader

        dcp = out / f"step_{LORA_STEPS}" / "dcp"
        keys = [k.removeprefix("model.") for k in FileSystemReader(str(dcp)).read_metadata().state_dict_metadata
                if k.startswith("model.")]
        # the fp32 base alone is 12.8 MB, of which its LM head 6.3 MB: the head's trained copy and its two moments
        assert sum(f.stat().st_size for f in dcp.iterdir()) < 2e6 + 3 * 4 * 49152 * 32
    assert keys and all("lora_" in k or ".modules_to_save." in k for k in keys), keys[:3]
    assert sum(".modules_to_save." in k for k in keys) == saved


def _assert_exported_is_trained(hf: Path, step: Path) -> None:
    """The export holds the checkpoint's weights: its logits are those of the model loaded from the sharded
    checkpoint in one process (whose state the resume above shows to be the run's)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from longtune.trainer.checkpoint import TorchParts, checkpoint_format
    from longtune.trainer.model import build_model
    from longtune.trainer.config import read_yaml, validate

    weights = load_file(hf / "model.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    cfg = validate(read_yaml(step / "config.resolved.yaml"))
    model = build_model(cfg.model, checkpoint=step)
    TorchParts(model).load(step)  # the sharded checkpoint gathered in one process, as export does
    exported = AutoModelForCausalLM.from_pretrained(hf)
    ids = torch.arange(16)[None]
    assert checkpoint_format(step) in ("dcp", "deepspeed")
    assert torch.equal(exported(ids).logits, model(ids).logits)


def test_a_rank_killed_mid_run_is_survived_by_a_torchrun_restart(reference, tmp_path, tiny_config):
    """torchrun --max-restarts 1: one rank SIGKILLed after step 5; the group restarts, resumes from step_4 by
    itself, and ends with the uninterrupted run's losses."""
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "c.yaml", _config(tiny_config, out))
    agent = start_cli("train", cfg, "--nproc", "2", "--max-restarts", "1")
    try:
        victim = None
        deadline = time.monotonic() + 300
        while victim is None and time.monotonic() < deadline and agent.poll() is None:
            if (out / "metrics.jsonl").exists() and max(train_losses(out), default=0) >= 5:
                ranks = psutil.Process(agent.pid).children()
                victim = ranks[-1]
                victim.send_signal(signal.SIGKILL)
            time.sleep(0.05)
        stdout, stderr = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert victim is not None, f"the run ended before a rank could be killed:\n{stderr[-2000:]}"
    assert agent.returncode == 0, stderr[-3000:]
    assert "torchrun restarted the group" in stdout and "resumed from" in stdout
    logged = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert len(logged) > len(set(logged)) == STEPS, "the steps after the last checkpoint ran again"
    _assert_matches(reference, out)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


# Fault injection for the next test, loaded by Python at start-up from PYTHONPATH: on rank 1 only, the third
# call of trainer.train.forward_backward raises (a bug, or a bad batch, on one rank).
_RANK_1_FAILS = """
import importlib.abc, importlib.util, os, sys

class _Inject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "longtune.trainer.train":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            real, calls = module.forward_backward, []

            def forward_backward(*args, **kwargs):
                calls.append(1)
                if len(calls) == 3:
                    raise RuntimeError("injected fault on rank 1")
                return real(*args, **kwargs)

            module.forward_backward = forward_backward

        spec.loader.exec_module = exec_module
        return spec

if os.environ.get("RANK") == "1":
    sys.meta_path.insert(0, _Inject())
"""


def test_a_rank_failing_alone_stops_the_others_with_its_error(tmp_path, tiny_config):
    """Rank 1 raises in its third step while rank 0 goes on into the gradient all-reduce: the job ends at once
    (long before parallel.timeout_s), with rank 1's error on its own line, and no checkpoint is left half written."""
    out, inject = tmp_path / "run", tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_RANK_1_FAILS)
    cfg = write_yaml(tmp_path / "c.yaml", _config(tiny_config, out))
    start = time.monotonic()
    result = run_cli("train", cfg, "--nproc", "2", "parallel.strategy=ddp", "parallel.timeout_s=600",
                     env={"PYTHONPATH": str(inject)}, timeout=300)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr[-3000:]
    assert "[rank 1] error: internal error at " in result.stderr
    assert "RuntimeError: injected fault on rank 1" in result.stderr
    assert "error: the training processes failed" in result.stderr and "each rank's own error is above" in result.stderr
    assert elapsed < 120, f"{elapsed:.0f} s: the surviving rank waited on its collective"
    assert max(train_losses(out)) == 2  # steps 1 and 2 logged, then the fault
    assert not [p for p in out.iterdir() if p.name.startswith("step_") or ".tmp" in p.name]


def test_ddp_carries_out_a_tight_memory_plan_with_the_state_off_the_gpu(reference, tmp_path, tiny_config):
    """DDP with the activation runtime (offload and recompute per chunk) and the optimizer and weights on the
    host: the offloaded optimizer takes each gradient in its hook, so it averages them over the ranks there
    (no DDP wrapper). The plain run's losses to the activation runtime's fp32 rounding (tests/test_train_plan)."""
    from conftest import plan_budget_gb

    out = tmp_path / "run"
    cfg = _config(tiny_config, out)
    cfg["memory"] = {"plan_chunks": 4, "optimizer": "cpu", "params": "cpu", "cpu_adam": "torch",
                     "nvme_path": str(tmp_path / "nvme")}
    budget = plan_budget_gb(cfg, 0.0)
    result = run_cli("train", write_yaml(tmp_path / "c.yaml", cfg), "--nproc", "2", f"memory.budget_gb={budget}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer on cpu" in result.stdout and "activations: the plan's decisions run" in result.stdout
    got = train_losses(out)
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(reference[step]["loss"], rel=1e-5), step
    places = {p for layer in yaml.safe_load((out / "plan.yaml").read_text())["layers"] for d in layer.values() for p in d}
    assert places - {"gpu"}, places  # the budget forces recompute or offload


@pytest.mark.parametrize("name", ["fsdp2", "zero2", "ddp-sp2"])
def test_sharded_strategies_carry_out_a_tight_memory_plan(name, reference, tmp_path, tiny_config):
    """The activation runtime under FSDP2 and ZeRO-2. FSDP2: each layer's forward runs on the weights FSDP2 just
    gathered, the saved weights stay as they are (gathered again before the layer's backward) and the chunks'
    gradients reach the unsharded parameters FSDP2 reduce-scatters. ZeRO-2: DeepSpeed's gradient hooks see one
    gradient per parameter and micro-batch. ddp-sp2: sequence parallel 2, each rank's plan made for its shard,
    the attention's all-to-alls inside the runtime's layer; resumed on 2 ranks from step 4. The plain run's
    losses and norms, to the tolerances above."""
    from conftest import budget_gb_placing, plan_budget_gb

    out = tmp_path / "run"
    sp = name.endswith("sp2")
    cfg = _config(tiny_config, out, **({"grad_accum_steps": 2} if sp else {}))
    cfg["parallel"] = {"strategy": "fsdp2"} if name == "fsdp2" else {"strategy": "ddp", "sequence_parallel": 2} \
        if sp else {"strategy": "deepspeed", "zero_stage": 2}
    # a slow GPU beside a fast host link: the solver offloads as well as recomputes
    machine = {"name": "slow-gpu", "gpu": {"memory_gb": 80, "bf16_tflops": 0.01, "matmul_efficiency": 1,
                                           "attention_efficiency": 1},
               "tiers": {"host": {"capacity_gb": 64, "to_gpu_gbps": 1000, "from_gpu_gbps": 1000}}}
    cfg["memory"] = {"plan_chunks": 4, "machine": str(write_yaml(tmp_path / "machine.yaml", machine))}
    budget = plan_budget_gb(cfg, 0.1, world=2) if sp else budget_gb_placing(cfg, {"recompute", "host"}, world=2)
    result = run_cli("train", write_yaml(tmp_path / "c.yaml", cfg), "--nproc", "2", f"memory.budget_gb={budget}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "activations: the plan's decisions run" in result.stdout
    assert "warning" not in result.stdout + result.stderr  # no saved tensor outside the plan (the weights)
    _assert_matches(reference, out)
    places = {p for layer in yaml.safe_load((out / "plan.yaml").read_text())["layers"] for d in layer.values() for p in d}
    # (the solver recomputes rather than offloads the 64-token shards; tests/test_sequence_parallel.py offloads them)
    assert ({"recompute"} if sp else {"recompute", "host"}) <= places, places
    for m in (m for m in read_metrics(out) if "loss" in m):  # the runtime's accounting beside the plan
        assert m["mem_measured_gpu_gb"] == pytest.approx(m["mem_plan_gpu_gb"], rel=0.05)
    if sp:
        assert "tokens in 4 chunks" in result.stdout and f"{128 // 2:,} tokens" in result.stdout  # a shard per rank
        resumed = run_cli("resume", out / "step_4", "--nproc", "2")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        _assert_matches(reference, out, steps=range(5, STEPS + 1))


def _together(commands: dict[str, list], folder: Path) -> dict[str, tuple[int, str]]:
    """`longtune ARGS` for each name at once (one start-up beside another's, where each leaves a core idle part of
    the time): name -> (exit code, stderr). Their output goes to files in `folder` (no pipe to fill and stall on)."""
    procs = {}
    try:
        for name, args in commands.items():
            logs = [open(folder / f"{name}.{f}", "w") for f in ("stdout", "stderr")]
            with logs[0], logs[1]:
                procs[name] = start_cli(*args, stdout=logs[0], stderr=logs[1])
        for proc in procs.values():
            proc.wait(timeout=600)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {name: (proc.returncode, (folder / f"{name}.stderr").read_text()) for name, proc in procs.items()}


def test_layerwise_galore_under_ddp_reduces_in_its_hooks_and_matches_one_process(tmp_path, tiny_config):
    """Layer-wise GaLore steps each weight in its gradient hook, before a DDP wrapper would reduce: under
    parallel.strategy=ddp the trainer hands it the process group and it averages each gradient there. The
    one-process run and the two ranks are launched at once."""
    galore = ["optim.name=galore_adamw", "optim.galore.rank=4", "optim.galore.layerwise=true",
              "train.clip_grad_norm=null", "train.max_steps=6"]
    one, two = tmp_path / "one", tmp_path / "two"
    cfg = write_yaml(tmp_path / "c.yaml", _config(tiny_config, one))
    done = _together({"one": ["train", cfg, *galore, "train.grad_accum_steps=2"],
                      "two": ["train", cfg, "--nproc", "2", *galore, f"run.output_dir={two}"]}, tmp_path)
    for name, (returncode, stderr) in done.items():
        assert returncode == 0, (name, stderr[-3000:])
    expected, got = train_losses(one), train_losses(two)
    assert got.keys() == expected.keys() and len(got) == 6
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=LOSS_RTOL), step
