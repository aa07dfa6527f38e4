"""`longtune bench`: the bisection, the memory cap on a probe's process tree, and the smoke suite end to end
(a 2-layer model, longtune and transformers side by side, a JSON with every probe)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import run_cli

from longtune.bench.caps import MemoryCap
from longtune.bench.runner import longest_fitting

LADDER = (512, 1024, 2048, 4096, 8192, 16384)


@pytest.mark.parametrize("limit", [0, 512, 1000, 2048, 4096, 16384, 10**6])
@pytest.mark.parametrize("start", [0, 3, 5])
def test_the_bisection_finds_the_boundary_in_log_probes(limit, start):
    asked = []

    def fits(seq):
        asked.append(seq)
        return seq <= limit

    best, first_fail = longest_fitting(LADDER, fits, start)
    fitting = [s for s in LADDER if s <= limit]
    assert best == (fitting[-1] if fitting else None)
    assert first_fail == next((s for s in LADDER if s > limit), None)
    assert asked[0] == LADDER[start] and len(asked) <= 4 and len(set(asked)) == len(asked)


def _child(mb: int) -> str:
    """A program that touches `mb` MiB and holds it a moment."""
    code = f"import time; x = bytearray({mb} << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(0.3)"
    return code


@pytest.mark.parametrize("mode", ["kernel", "watchdog"])
def test_a_probe_over_the_cap_is_killed_and_one_under_it_is_measured(mode, monkeypatch):
    if mode == "watchdog":  # what a machine without a writable cgroup gets
        monkeypatch.setattr(MemoryCap, "_make_v2", lambda self, name: (_ for _ in ()).throw(OSError()))
        monkeypatch.setattr(MemoryCap, "_make_v1", lambda self, name: (_ for _ in ()).throw(OSError()))
    results = {}
    for mb in (100, 800):
        cap = MemoryCap(400e6)
        proc = subprocess.Popen([sys.executable, "-c", _child(mb)], preexec_fn=cap.join)
        cap.watch(proc.pid)
        # the kernel counts and enforces: nothing in this process samples the tree (it would take the probe's cores)
        assert (cap._thread is None) == (mode == "kernel" and cap.enforced_by.startswith("cgroup"))
        proc.wait(timeout=60)
        results[mb] = (proc.returncode, cap.finish())
    if mode == "watchdog":
        assert results[100][1]["enforced_by"] == "watchdog"
    code, mem = results[100]
    assert code == 0 and not mem["oom_killed"] and 0.1 < mem["peak_gb"] < 0.4, mem
    code, mem = results[800]
    assert code == -9 and mem["oom_killed"], mem


def test_the_smoke_suite_runs_longtune_beside_transformers_and_writes_every_probe(tmp_path):
    out = tmp_path / "smoke.json"
    result = run_cli("bench", "smoke", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[1/2] tiny longtune @ 128 tokens ..." in result.stdout and "fits: step" in result.stdout
    record = json.loads(out.read_text())
    assert record["environment"]["torch"] and record["commit"] and record["command"].startswith("longtune bench smoke")
    rows = record["models"]["tiny"]
    assert set(rows) == {"longtune", "hf"}
    for system, row in rows.items():
        assert row["longest_seq"] == 128 and row["first_failing_seq"] is None, (system, row)
        assert row["tokens_per_s_at_rate_seq"] > 0 and row["peak_gb_at_rate_seq"] > 0
        assert all(p["ok"] and p["startup_s"] > 0 for p in row["probes"])
    planned = rows["longtune"]["probes"][0]
    assert planned["mem_measured_gpu_gb"] == pytest.approx(planned["mem_plan_gpu_gb"], rel=0.05)
    assert "longtune @ 128: plan" in result.stdout  # the prediction beside the measurement
    # the process's cgroup peak against its measured baseline + the plan's device and host bytes (issue 24)
    process = planned["process"]
    assert process["within"] and process["baseline_gb"] > 0 and record["claims"]["process_within_plan"]["holds"], process
    # the measured step beside the plan's prediction from this CPU's own measured compute rate (issue 25)
    step, profile = planned["step_time"], record["machine_profile"]
    assert step["measured_s"] == planned["step_s"][-1] and step["predicted_s"] == planned["time_plan_s"] > 0
    assert profile["gpu"]["calibrated"]["step_s"].keys() == {"256", "1024"}  # `longtune probe --config`: its own step
    assert profile["tiers"]["nvme"]["read_gbps"] > 0 and record["claims"]["step_time_within_plan"]["probes"] == 1
    assert "x the plan's" in result.stdout
    # past the real probes (real_until): longtune's ceiling by its planner, and a dry run of one step there
    ceiling = rows["longtune"]["planned_longest"]
    assert ceiling["seq_len"] > 128 and ceiling["inside_budget"] and 0.8 < ceiling["ratio"] <= 1.0, ceiling
    assert "no plan fits" in ceiling["next_failure"] and "the plan's longest:" in result.stdout


def test_an_out_of_memory_is_a_data_point_not_a_crash(tmp_path):
    out = tmp_path / "oom.json"
    result = run_cli("bench", "smoke", "--systems", "hf", "--cap-gb", "0.3", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(out.read_text())["models"]["tiny"]["hf"]
    assert row["longest_seq"] is None and row["first_failing_seq"] == 64
    assert [p["seq"] for p in row["probes"]] == [128, 64]
    assert all(p["reason"] == "out of memory" and p["returncode"] == -9 for p in row["probes"])
    assert "does not fit: out of memory: killed at the 0.3 GB cap" in result.stdout


def test_bad_bench_arguments_are_one_line_errors(tmp_path):
    unknown = run_cli("bench", "smoke", "--systems", "hf,hf-typo", "--out", tmp_path / "x.json")
    assert unknown.returncode == 2 and "--systems: hf-typo not in the smoke suite (longtune, hf)" in unknown.stderr
    import torch

    if torch.cuda.is_available():
        return  # the gpu suite would run
    gpu = run_cli("bench", "gpu")
    assert gpu.returncode == 2 and "the gpu suite needs a CUDA GPU; run `longtune bench cpu` here" in gpu.stderr
    assert not (tmp_path / "x.json").exists()


def test_deepspeed_zero3_offload_trains_on_the_cpu_as_transformers_does(tmp_path):
    """The DeepSpeed peer in one process on a CPU machine: gloo, torch's AdamW, nothing compiled (any JIT build would
    land in TORCH_EXTENSIONS_DIR), and the same first-step loss as transformers on the same weights and tokens."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU path: on a GPU the probe takes DeepSpeed's own CPU Adam")
    from longtune.bench.runner import PROBE_ENV, run_probe
    from longtune.launch.isolation import safe_env

    extensions = tmp_path / "torch_extensions"
    env = safe_env(TOKENIZERS_PARALLELISM="false", TORCH_EXTENSIONS_DIR=str(extensions), **PROBE_ENV)
    spec = {"model": "tiny", "seq": 128, "steps": 1, "dtype": "float32"}
    ds, hf = (run_probe({**spec, "system": s}, None, 120, env) for s in ("deepspeed-zero3-offload", "hf-gc"))
    assert ds["ok"] and hf["ok"], (ds, hf)
    assert ds["optimizer"] == "AdamW" and not extensions.exists()
    assert ds["loss"] == pytest.approx(hf["loss"], rel=1e-5) and 10 < ds["loss"] < 12  # ln(49152) = 10.8
    assert ds["peak_gb"] > 0 and ds["tflops"] > 0 and len(ds["step_s"]) == 1


def test_alst_trains_on_the_cpu_as_transformers_does():
    """ALST (DeepSpeed's TiledMLP and TiledFusedLogitsLoss on transformers, checkpointing on): the same losses as
    hf-gc at both steps, and the same gradients with the loss in several slices. The gradients are compared directly:
    AdamW hides their scale from the losses (the sum divided after TiledFusedLogitsLoss gives lm_head n times its
    gradient and the same second-step loss to the last bit)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU path: on a GPU the probe offloads the checkpointed inputs to host memory")
    import types

    import longtune.trainer.deepspeed_files  # noqa: F401 -- DeepSpeed's CPU accelerator, before DeepSpeed
    from longtune.bench import systems
    from longtune.bench.runner import PROBE_ENV, run_probe
    from longtune.launch.isolation import safe_env

    env = safe_env(TOKENIZERS_PARALLELISM="false", **PROBE_ENV)
    spec = {"model": "tiny", "seq": 128, "steps": 2, "dtype": "float32"}  # seq 2 x hidden: the MLP in 2 slices
    alst, hf = (run_probe({**spec, "system": s}, None, 120, env) for s in ("alst", "hf-gc"))
    assert alst["ok"] and hf["ok"], (alst, hf)
    # the second step's loss (the first is compared below, with every gradient)
    assert alst["loss"] == pytest.approx(hf["loss"], rel=1e-5) and 10 < alst["loss"] < 12  # ln(49152) = 10.8
    assert alst["peak_gb"] > 0 and alst["tflops"] > 0 and len(alst["step_s"]) == 2

    ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
    grads = []
    for tiled in (False, True):
        model = systems._hf_model(spec)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if tiled:
            for layer in model.model.layers:
                layer.mlp.forward = types.MethodType(systems._tiled_mlp_forward, layer.mlp)
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            loss = systems._tiled_loss(model, hidden, ids, shards=3)  # 43 + 43 + 42 positions
        else:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads.append((loss.item(), {name: p.grad for name, p in model.named_parameters()}))
    (hf_loss, hf_grads), (alst_loss, alst_grads) = grads
    assert alst_loss == pytest.approx(hf_loss, rel=1e-5)
    for name, grad in hf_grads.items():
        assert (alst_grads[name] - grad).norm() <= 1e-5 * grad.norm(), name
