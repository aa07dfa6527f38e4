"""`longtune bench NAME [--quick]`: longtune and the tools users run today, side by side, in one invocation.

    longtune bench cpu --quick      # under 10 minutes: SmolLM2-135M, 512-2048 tokens, a 3.5 GB RAM cap
    longtune bench cpu              # SmolLM2-135M, 1K-16K tokens, a 6 GB RAM cap
    longtune bench gpu              # Llama-3.2-1B and Llama-3-8B architectures, bf16, up to 512K tokens

Every probe (one system, one sequence length, a training step or a few) runs in its own process under the
suite's memory cap (bench/caps.py: a cgroup, or a watchdog), so an out-of-memory is a data point, not a crash.
For each model and system the runner finds the longest trainable context by bisection over the suite's
ladder of lengths, starting at the length where it also measures tokens/s; it prints a progress line per
probe, then a table with each system's figures beside plain transformers', and writes every figure and every
failure with its reason to bench/results/<device>-<date>-<name>.json, with the versions and the commit.

On the CPU each probe takes two steps, so its peak is that of a step in steady state (torch AdamW makes its moments
in the first step, which then holds less than every later one), and each longtune probe checks the claim that a
budget is what the process uses: the cgroup's peak of its process within 5% of its baseline (the memory the trainer
measured outside the plan right before step 1) plus the plan's device and host bytes (`process` in the JSON, a
line under the table, `claims` at the top). Its plan is made with this CPU's profile, measured first by `longtune
probe --config` on the suite's own config (the step timed at two lengths, memcpy, the disk), and each probe's timed
step is put beside the plan's prediction, by term (`step_time`). longtune is trained for real up to the suite's
`real_until`; past it, its ceiling is its planner's (`longtune plan --longest`) with a dry run of one step there
(`planned_longest`): on two cores a step at the ceiling would take hours.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from longtune.trainer.errors import ConfigError

from .caps import GB, MemoryCap
from .provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
BASELINE = "hf"
# Every probe, every system: glibc's mmap threshold fixed. By default it rises to the largest block freed (up
# to 32 MB), after which activation-sized buffers come from the heap and stay in the process when freed: the
# process's memory then tracks its history, not what it holds (measured: +0.47 GB for longtune at 4K tokens).
# longtune sets the same itself when its runtime is built (trainer/memory.steady_allocator); the peers do not.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
# A longtune probe's process peak against its baseline + the plan's device and host bytes: within this, either way.
PROCESS_TOLERANCE = 0.05
STEP_TOLERANCE = 0.10  # a longtune probe's measured step against the plan's predicted one (issue 25)


@dataclass(frozen=True)
class Suite:
    models: tuple[str, ...]
    systems: tuple[str, ...]
    ladder: tuple[int, ...]  # sequence lengths, increasing: the bisection's points
    rate_seq: int  # where tokens/s is measured (the bisection starts there)
    device: str  # "cpu" or "cuda"
    dtype: str
    cap_gb: Optional[float]  # CPU: the RAM cap of each probe's process tree; GPU: None = the device's memory
    steps: int = 2  # per probe; the last step is the timed one (the first makes the optimizer's moments)
    # CPU, longtune: of the cap, what its process holds outside the plan (libraries, data, allocator slack: the
    # baseline, measured at 0.5-0.55 GB for SmolLM2, plus a margin), and what it sets aside as the host tier (host
    # RAM is the device there); the plan's budget is the rest
    reserve_gb: float = 1.0
    host_gb: float = 1.5
    probe_timeout_s: float = 3600.0
    deadline_s: Optional[float] = None  # the whole suite: probes past it are not run (and say so)
    # longtune is trained for real up to this length (None: the whole ladder); its ceiling past it is the plan's
    # (`longtune plan --longest`), checked by a dry run at that length (`longtune plan --dry-run`): on two CPU
    # cores a step at the ceiling would take hours, its memory is what the plan and the dry run say
    real_until: Optional[int] = None
    calibrate: tuple[int, int] = (1024, 4096)  # CPU: the lengths `longtune probe --config` times the step at
    notes: tuple[str, ...] = field(default_factory=tuple)


CPU_SYSTEMS = ("longtune", "hf", "hf-gc", "hf-save-on-cpu", "alst", "deepspeed-zero3-offload")
GPU_SYSTEMS = ("longtune", "hf", "hf-gc", "hf-save-on-cpu", "alst", "hf-liger", "hf-gc-galore",
               "deepspeed-zero3-offload")
SUITES = {
    "cpu": Suite(("smollm2-135m",), CPU_SYSTEMS, (1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384), 4096,
                 "cpu", "float32", cap_gb=6.0, real_until=8192),
    # a 1.3 GB budget: the optimizer state and the decoder weights on NVMe, through host stagings
    "cpu-quick": Suite(("smollm2-135m",), CPU_SYSTEMS, (512, 1024, 2048), 1024, "cpu", "float32", cap_gb=3.5,
                       reserve_gb=0.7, host_gb=1.5, probe_timeout_s=600, calibrate=(512, 2048)),
    # one 10-minute device command: probes that would start past the deadline are reported as not run
    "gpu": Suite(("llama-3.2-1b", "llama-3-8b"), GPU_SYSTEMS, (16384, 32768, 65536, 131072, 262144, 524288), 16384,
                 "cuda", "bfloat16", cap_gb=None, steps=2, probe_timeout_s=120, deadline_s=540),
    "gpu-quick": Suite(("llama-3.2-1b",), GPU_SYSTEMS, (16384, 32768, 65536, 131072), 16384, "cuda", "bfloat16",
                       cap_gb=None, steps=2, probe_timeout_s=90, deadline_s=240),
    # the runner's own tests: a 2-layer model, seconds per probe
    "smoke": Suite(("tiny",), ("longtune", "hf"), (64, 128), 128, "cpu", "float32", cap_gb=3.0,
                   reserve_gb=1.0, probe_timeout_s=300, real_until=128, calibrate=(256, 1024)),
}


# --- one probe --------------------------------------------------------------------------------------------
def run_probe(spec: dict, cap_gb: Optional[float], timeout_s: float, env: dict[str, str]) -> dict:
    """One system at one length in its own process, under the cap: the child's RESULT, or why there is none.
    `env`: the child's environment (run's, kept off the repo root it runs in)."""
    cap = MemoryCap(cap_gb * GB) if cap_gb else None
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "longtune.bench.systems", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            preexec_fn=cap.join if cap else None)
    if cap:
        cap.watch(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        timed_out = True
    mem = cap.finish() if cap else {}
    line = next((x for x in reversed(out.splitlines()) if x.startswith("RESULT ")), None)
    result = json.loads(line[len("RESULT "):]) if line else {"ok": False}
    if not line:
        if timed_out:
            result["reason"] = f"timed out after {timeout_s:.0f} s"
        elif mem.get("oom_killed") or proc.returncode == -9:
            result["reason"] = "out of memory"
            result["error"] = f"killed at the {cap_gb:g} GB cap ({mem.get('enforced_by')})" if cap else "killed (SIGKILL)"
        else:
            result["reason"] = "crashed"
            result["error"] = (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:400]
    elif not result["ok"] and result.get("reason") == "error" and mem.get("oom_killed"):
        result["reason"] = "out of memory"
    if not result["ok"]:
        result["stderr_tail"] = err.strip().splitlines()[-5:]
    result.update(wall_s=time.perf_counter() - start, returncode=proc.returncode)
    if mem:
        result["cap"] = mem
    process = process_against_plan(result)
    if process:
        result["process"] = process
    step = step_against_plan(result)
    if step:
        result["step_time"] = step
    return result


def step_against_plan(r: dict) -> Optional[dict]:
    """A longtune probe's last (timed) step beside the plan's prediction for it (`time_plan_s`, from the machine
    profile the probe planned with), whole and by term, and whether the whole is within STEP_TOLERANCE. Terms:
    recompute (the runtime times it); waits (the time the step waited for copies and the tiers, measured by the
    runtime, against the plan's exposed transfers and the state placement's time); compute (the rest)."""
    if not (r.get("ok") and r.get("time_plan_s")):
        return None
    measured, predicted = r["step_s"][-1], r["time_plan_s"]
    plan = r.get("plan_step_s") or {}
    recompute, recompute_plan = r.get("recompute_s", 0.0), r.get("recompute_plan_s", 0.0)
    waits = r.get("offload_wait_s", 0.0)
    waits_plan = (plan.get("exposed_transfer_s") or 0.0) + (plan.get("state_s") or 0.0)
    return {"measured_s": measured, "predicted_s": predicted, "ratio": measured / predicted,
            "within": abs(measured / predicted - 1) <= STEP_TOLERANCE, "tolerance": STEP_TOLERANCE,
            "terms": {"recompute": {"measured_s": recompute, "predicted_s": recompute_plan},
                      **{f"recompute {part}": {"measured_s": r[f"recompute_{part}_s"],
                                               "predicted_s": r[f"recompute_plan_{part}_s"]}
                         for part in ("pre", "post") if r.get(f"recompute_{part}_s") or r.get(f"recompute_plan_{part}_s")},
                      "waits": {"measured_s": waits, "predicted_s": waits_plan},
                      "compute": {"measured_s": measured - recompute - waits,
                                  "predicted_s": predicted - recompute_plan - waits_plan}}}


def process_against_plan(r: dict) -> Optional[dict]:
    """A longtune probe that ran on the CPU under a cap: the cap's peak of its process (the cgroup's, page cache
    included) against its baseline plus the plan's device and host bytes, and whether it is within
    PROCESS_TOLERANCE of it (on the CPU the device is host RAM: every byte of the plan is in the process)."""
    if not (r.get("ok") and r.get("cap") and "plan_peak_gb" in r and r.get("baseline_gb") is not None):
        return None
    host = sum(v for k, v in r.get("plan_tiers_gb", {}).items() if k in ("host", "cxl"))
    predicted = r["baseline_gb"] + r["plan_peak_gb"] + host
    peak = r["cap"]["peak_gb"]
    return {"peak_gb": peak, "measured_by": r["cap"]["enforced_by"], "baseline_gb": r["baseline_gb"],
            "baseline_source": r.get("baseline_source"), "plan_device_gb": r["plan_peak_gb"], "plan_host_gb": host,
            "predicted_gb": predicted, "ratio": peak / predicted,
            "within": abs(peak / predicted - 1) <= PROCESS_TOLERANCE, "tolerance": PROCESS_TOLERANCE}


# --- bisection --------------------------------------------------------------------------------------------
def machine_profile(suite: "Suite", env: dict[str, str], log=print) -> dict:
    """This CPU as `longtune probe --config` measures it for the suite's longtune config: the model's own step at
    two of the ladder's lengths (the compute rates the plan prices a step at), host memcpy and the disk under a
    temporary folder (the links); capacities left to the suite (the cap is the device's: it is not the profile's
    to say). Run in a child process, as a user runs it, so the runner holds no model."""
    import yaml

    from .systems import longtune_config

    short, long = suite.calibrate
    with tempfile.TemporaryDirectory(prefix="longtune-bench-probe-") as tmp:
        work = Path(tmp)
        spec = {"model": suite.models[0], "seq": long, "steps": 1, "dtype": suite.dtype, "budget_gb": 1.0,
                "host_gb": suite.host_gb}
        (work / "config.yaml").write_text(yaml.safe_dump(longtune_config(spec, work, cpu=True)))
        (work / "nvme").mkdir()
        _longtune_cli(env, "probe", "--config", work / "config.yaml", "--lengths", f"{short},{long}",
                      "--nvme-path", work / "nvme", "--size-mb", 256, "--out", work / "machine.yaml")
        profile = yaml.safe_load((work / "machine.yaml").read_text())
    profile["name"] = "cpu-bench"
    profile["gpu"]["memory_gb"] = 1000  # the suite's budget decides
    for tier, capacity in (("host", 1000), ("nvme", 200)):
        profile["tiers"][tier]["capacity_gb"] = capacity
        profile["tiers"][tier].pop("path", None)
    return profile


def longest_fitting(ladder: tuple[int, ...], fits: Callable[[int], bool], start: int) -> tuple[Optional[int], Optional[int]]:
    """(the longest length of `ladder` that fits, the shortest that does not), by bisection from ladder[start];
    a length assumed to fit when a longer one does (memory grows with the length). None: none fits / all fit."""
    lo, hi, i = -1, len(ladder), start
    while hi - lo > 1:
        if fits(ladder[i]):
            lo = i
        else:
            hi = i
        i = (lo + hi) // 2
    return (ladder[lo] if lo >= 0 else None), (ladder[hi] if hi < len(ladder) else None)


# --- the suite ----------------------------------------------------------------------------------------------
def run_suite(name: str, suite: Suite, env: dict[str, str], log=print) -> dict:
    results = {"suite": name, "config": asdict(suite), "models": {}}
    if suite.device == "cpu" and "longtune" in suite.systems:
        # longtune plans with this machine's own profile (`longtune probe --config`), so that its predicted step
        # times are this machine's
        log("measuring this CPU with `longtune probe --config` (the model's own step at two lengths, memcpy, disk) ...")
        profile = results["machine_profile"] = machine_profile(suite, env)
        gpu, tiers = profile["gpu"], profile["tiers"]
        calibrated = gpu["calibrated"]
        log(f"    the model's step: {', '.join(f'{float(s):.2f} s at {int(n):,}' for n, s in calibrated['step_s'].items())} "
            f"tokens: matmuls at {calibrated['matmul_tflops']:.3f} TFLOPS, attention at "
            f"{calibrated['attention_tflops']:.3f}; a recompute "
            f"{', '.join(f'{part} {f:.2f}x' for part, f in gpu.get('recompute_factor', {}).items())} its FLOPs' time; memcpy {tiers['host']['to_gpu_gbps']:.1f} GB/s, disk read "
            f"{tiers['nvme']['read_gbps']:.2f} / write {tiers['nvme']['write_gbps']:.2f} GB/s")
        if calibrated.get("attention_from", "the step") != "the step":
            log("    (the step did not grow faster than the tokens: attention priced at the attention kernel's rate)")
    deadline = time.monotonic() + suite.deadline_s if suite.deadline_s else None
    total = len(suite.models) * len(suite.systems)
    done = 0
    for model in suite.models:
        rows = results["models"][model] = {}
        for system in suite.systems:
            done += 1
            probes: list[dict] = []

            def fits(seq: int, system=system, probes=probes) -> bool:
                spec = {"system": system, "model": model, "seq": seq, "steps": suite.steps, "dtype": suite.dtype}
                if system == "longtune":
                    if suite.device == "cpu":
                        spec.update(_longtune_on_cpu(suite, results))
                    else:
                        spec["budget_gb"] = suite.cap_gb or "auto"
                left = deadline - time.monotonic() if deadline else suite.probe_timeout_s
                if left < 30:
                    log(f"[{done}/{total}] {model} {system} @ {seq:,} tokens: not run (the suite's deadline)")
                    probes.append({"seq": seq, "ok": False, "reason": "not run", "error": "the suite's deadline"})
                    raise _Broken(probes[-1])
                log(f"[{done}/{total}] {model} {system} @ {seq:,} tokens ...")
                r = run_probe(spec, suite.cap_gb if suite.device == "cpu" else None, min(suite.probe_timeout_s, left), env)
                r["seq"] = seq
                probes.append(r)
                log("    " + _probe_line(r))
                if not r["ok"] and r.get("reason") not in ("out of memory", "infeasible") \
                        and not str(r.get("reason")).startswith("timed out"):
                    raise _Broken(r)  # an error is not a memory limit: the search would only repeat it
                return bool(r["ok"])

            ladder = suite.ladder
            if system == "longtune" and suite.real_until:
                ladder = tuple(n for n in ladder if n <= suite.real_until)
            start = ladder.index(suite.rate_seq)
            try:
                best, first_fail = longest_fitting(ladder, fits, start)
            except _Broken as e:  # what is known so far
                best = max((p["seq"] for p in probes if p["ok"]), default=None)
                first_fail = e.probe["seq"]
            rate = next((p for p in probes if p["seq"] == suite.rate_seq), None)
            failed = next((p for p in probes if p["seq"] == first_fail), None)
            rows[system] = {
                "longest_seq": best, "first_failing_seq": first_fail,
                "first_failure": failed and {k: failed.get(k) for k in ("reason", "error")},
                "tokens_per_s_at_rate_seq": rate.get("tokens_per_s") if rate and rate["ok"] else None,
                "peak_gb_at_rate_seq": rate.get("peak_gb") if rate and rate["ok"] else None,
                "probes": probes,
            }
            if system == "longtune" and suite.real_until and best == ladder[-1]:
                spec = {"model": model, "seq": best, "steps": suite.steps, "dtype": suite.dtype,
                        **_longtune_on_cpu(suite, results)}
                log(f"[{done}/{total}] {model} {system}: past {best:,} tokens, the plan's longest context and a dry "
                    "run at it ...")
                ceiling = rows[system]["planned_longest"] = planned_longest(spec, env)
                log("    " + _ceiling_words(ceiling))
    return results


def _longtune_cli(env: dict[str, str], *args) -> str:
    """`longtune ARGS` in a child process, as a user runs it; its stdout, or a RuntimeError with its last error line."""
    args = [str(a) for a in args]
    done = subprocess.run([sys.executable, "-m", "longtune.launch.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"longtune {' '.join(args[:1] + [a for a in args if a.startswith('--')])} failed: "
                           f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return done.stdout


def planned_longest(spec: dict, env: dict[str, str]) -> dict:
    """longtune's longest context for a probe's config by its own planner (`longtune plan --longest`, the state
    placement searched too), and one step of that plan at that length on fake tensors (`longtune plan --dry-run`):
    the dry run's device and host peaks beside the plan's, and whether the device's stays inside the budget."""
    import yaml

    from .systems import longtune_config

    def plan(work: Path, *args: str) -> dict:
        out = _longtune_cli(env, "plan", work / "config.yaml", "--json", *args)
        return json.loads(next(x for x in reversed(out.splitlines()) if x.startswith("{")))

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="longtune-bench-plan-") as tmp:
        work = Path(tmp)
        (work / "config.yaml").write_text(yaml.safe_dump(longtune_config(spec, work, cpu=True)))
        found = plan(work, "--longest")["longest_context"]
        n = found["seq_len"]
        spec = {**spec, "seq": n}  # (positions past the model's own, as the probes get them)
        (work / "config.yaml").write_text(yaml.safe_dump(longtune_config(spec, work, cpu=True)))
        checked = plan(work, "--dry-run")
    budget = spec["budget_gb"] * GB
    gpu = checked["dry_run"]["bytes"].get("GPU peak") or {}
    return {"seq_len": n, "next_failure": found.get("next_failure"), "placement": found.get("placement"),
            "predicted_step_s": found.get("step_time_s"),
            "dry_run": checked["dry_run"]["bytes"], "dry_run_ops": checked["dry_run"]["ops"],
            "inside_budget": bool(gpu) and gpu["dry_run"] <= budget,
            "ratio": gpu["dry_run"] / gpu["plan"] if gpu else None, "seconds": time.perf_counter() - start}


def _ceiling_words(c: dict, beside: str = "") -> str:
    gpu = c["dry_run"].get("GPU peak") or {}
    return (f"the plan's longest: {c['seq_len']:,} tokens{beside} ({c['placement']}; predicted step "
            f"{c['predicted_step_s']:.0f} s); "
            f"dry run there: device peak {gpu.get('dry_run', 0) / GB:.2f} GB against the plan's {gpu.get('plan', 0) / GB:.2f}"
            f" ({'inside' if c['inside_budget'] else 'OVER'} the budget); next: {c['next_failure']}")


def _longtune_on_cpu(suite: Suite, results: dict) -> dict:
    """A longtune probe's share of the cap on the CPU (the budget: the cap less its reserve and host tier) and the
    machine profile measured for the suite."""
    return {"budget_gb": suite.cap_gb - suite.reserve_gb - suite.host_gb, "host_gb": suite.host_gb,
            "machine_profile": results.get("machine_profile")}


class _Broken(Exception):
    def __init__(self, probe: dict):
        super().__init__(probe.get("error"))
        self.probe = probe


def _probe_line(r: dict) -> str:
    if r["ok"]:
        extra = f", plan {r['plan_peak_gb']:.2f} GB" if "plan_peak_gb" in r else ""
        cap = f", cgroup peak {r['cap']['peak_gb']:.2f} GB" if r.get("cap") else ""
        process = f"; {_process_words(r['process'])}" if r.get("process") else ""
        step = f"; {_step_words(r['step_time'])}" if r.get("step_time") else ""
        return (f"fits: step {r['step_s'][-1]:.1f} s, {r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_gb']:.2f} GB"
                f"{cap}{extra} ({r['wall_s']:.0f} s){process}{step}")
    return f"does not fit: {r.get('reason')}: {r.get('error', '')} ({r['wall_s']:.0f} s)"


def _process_words(p: dict) -> str:
    verdict = "within" if p["within"] else "NOT within"
    return (f"process {p['peak_gb']:.3f} GB = {p['ratio']:.3f} x (baseline {p['baseline_gb']:.3f} + plan "
            f"{p['plan_device_gb']:.3f} device + {p['plan_host_gb']:.3f} host = {p['predicted_gb']:.3f} GB): "
            f"{verdict} {p['tolerance']:.0%}")


def _step_words(s: dict) -> str:
    t = s["terms"]
    return (f"step {s['measured_s']:.2f} s = {s['ratio']:.2f} x the plan's {s['predicted_s']:.2f} s "
            f"({'within' if s['within'] else 'NOT within'} {s['tolerance']:.0%}; measured / planned: "
            + ", ".join(f"{name} {v['measured_s']:.2f} / {v['predicted_s']:.2f} s" for name, v in t.items()) + ")")


def _claim(results: dict, key: str, claim: str) -> Optional[dict]:
    """Over every longtune probe that fitted and carries `key` (a comparison with a ratio and a verdict): whether
    each is within its tolerance."""
    probes = [(model, p) for model, rows in results["models"].items() for system, row in rows.items()
              for p in row["probes"] if system == "longtune" and p.get(key)]
    if not probes:
        return None
    ratios = {f"{model} @ {p['seq']}": p[key]["ratio"] for model, p in probes}
    return {"claim": claim, "holds": all(p[key]["within"] for _, p in probes), "probes": len(probes),
            "ratios": ratios, "min_ratio": min(ratios.values()), "max_ratio": max(ratios.values())}


def step_claim(results: dict) -> Optional[dict]:
    """Is every longtune probe's measured step within STEP_TOLERANCE of the plan's?"""
    claim = _claim(results, "step_time", f"each longtune probe's measured step within {STEP_TOLERANCE:.0%} of the "
                                         "plan's predicted step (from the machine profile it planned with)")
    return claim and {**claim, "machine_profile": results.get("machine_profile")}


def process_claim(results: dict) -> Optional[dict]:
    """Does every longtune probe's process stay within PROCESS_TOLERANCE of its baseline + its plan?"""
    return _claim(results, "process", f"each longtune probe's process peak (cgroup) within {PROCESS_TOLERANCE:.0%} "
                                      "of its baseline + the plan's device and host bytes")


def table(results: dict, suite: Suite) -> str:
    lines = []
    for model, rows in results["models"].items():
        base = rows.get(BASELINE, {})
        cap = f"{suite.cap_gb:g} GB RAM cap" if suite.device == "cpu" else "the GPU's memory"
        lines.append(f"\n{model}, {suite.dtype}, {cap}; tokens/s at {suite.rate_seq:,} tokens")
        lines.append(f"{'system':<26}{'longest context':>16}{'x hf':>7}{'first failing (reason)':>36}"
                     f"{'tokens/s':>11}{'x hf':>7}{'peak GB':>9}")
        for system, row in rows.items():
            best, fail = row["longest_seq"], row["first_failing_seq"]
            best_s = f"{best:,}" if best else f"< {suite.ladder[0]:,}"
            if best and fail is None:
                best_s = f">= {best:,}"
            x_len = f"{best / base['longest_seq']:.1f}" if best and base.get("longest_seq") else "-"
            why = f"{fail:,} ({row['first_failure']['reason']})" if fail else "-"
            tps, base_tps = row["tokens_per_s_at_rate_seq"], base.get("tokens_per_s_at_rate_seq")
            tps_s = f"{tps:,.0f}" if tps else "OOM" if _oom_at_rate(row, suite) else "-"
            x_tps = f"{tps / base_tps:.2f}" if tps and base_tps else "-"
            peak = f"{row['peak_gb_at_rate_seq']:.2f}" if row["peak_gb_at_rate_seq"] else "-"
            lines.append(f"{system:<26}{best_s:>16}{x_len:>7}{why:>36}{tps_s:>11}{x_tps:>7}{peak:>9}")
            if row.get("planned_longest"):
                c = row["planned_longest"]
                x = f" ({c['seq_len'] / base['longest_seq']:.1f}x hf)" if base.get("longest_seq") else ""
                lines.append(f"  {system}: trained for real to {best:,} tokens (the suite's real_until); "
                             + _ceiling_words(c, x))
        for system, row in rows.items():  # the plan's prediction beside the measured peak
            for p in (p for p in row["probes"] if p["ok"] and "plan_peak_gb" in p):
                host = p.get("plan_tiers_gb", {}).get("host", 0.0)
                lines.append(f"  {system} @ {p['seq']:,}: plan {p['plan_peak_gb']:.2f} GB on the device + "
                             f"{host:.2f} GB host, measured peak {p['peak_gb']:.2f} GB"
                             + (f" (cgroup {p['cap']['peak_gb']:.2f} GB)" if p.get("cap") else "")
                             + f"; activations measured {p.get('mem_measured_gpu_gb', 0):.2f} / planned "
                               f"{p.get('mem_plan_gpu_gb', 0):.2f} GB")
                if p.get("process"):
                    lines.append(f"    {_process_words(p['process'])}")
                if p.get("step_time"):
                    lines.append(f"    {_step_words(p['step_time'])}")
    for claim in (process_claim(results), step_claim(results)):
        if claim:
            lines.append(f"\n{claim['claim']}: {'yes' if claim['holds'] else 'NO'}, at {claim['probes']} probe(s), "
                         f"ratios {claim['min_ratio']:.3f}-{claim['max_ratio']:.3f}")
    return "\n".join(lines)


def _oom_at_rate(row: dict, suite: Suite) -> bool:
    return any(p["seq"] == suite.rate_seq and p.get("reason") == "out of memory" for p in row["probes"])


# --- provenance ------------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import importlib.metadata as md

    import psutil
    import torch

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "platform": platform.platform(),
           "cpu": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(),
           "ram_gb": psutil.virtual_memory().total / GB,
           **{p: version(p) for p in ("torch", "transformers", "deepspeed", "liger-kernel", "galore-torch",
                                      "flash-attn", "triton")}}
    if device == "cuda" and torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), gpu_memory_gb=torch.cuda.get_device_properties(0).total_memory / GB,
                   cuda=torch.version.cuda)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            env["driver"] = None
    return env


def device_name(env: dict, device: str) -> str:
    if device == "cuda" and env.get("gpu"):
        return env["gpu"].lower().replace("nvidia ", "nvidia-").replace(" ", "-")
    return f"cpu-{env['cpu_cores']}core"


# --- the command ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(n for n in SUITES if not n.endswith("-quick")), help="the suite")
    parser.add_argument("--quick", action="store_true", help="the suite's short form (minutes)")
    parser.add_argument("--systems", help="a comma-separated subset of the suite's systems")
    parser.add_argument("--cap-gb", type=float, help="the memory cap of each probe (CPU suites; default: the suite's)")
    parser.add_argument("--out", help="the JSON to write (default: bench/results/<device>-<date>-<name>.json)")


def _checked_arguments(args: argparse.Namespace, name: str, suite: Suite) -> Suite:
    """--systems and --cap-gb, checked before the suite runs (it takes minutes to hours; --out too, in run): an empty
    or unknown system, or a cap that is not a positive number of GB (0 was the default, -1 failed every probe, nan
    crashed) or leaves longtune no budget, is a usage error."""
    if args.systems is not None:
        chosen = [s.strip() for s in args.systems.split(",")]
        unknown = sorted({repr(s) if not s else s for s in chosen} - set(suite.systems))
        if unknown:
            raise ConfigError(f"--systems: {', '.join(unknown)} not in the {name} suite ({', '.join(suite.systems)})")
        suite = replace(suite, systems=tuple(s for s in suite.systems if s in chosen))
    if args.cap_gb is not None:
        if not math.isfinite(args.cap_gb) or args.cap_gb <= 0:
            raise ConfigError(f"--cap-gb must be a positive number of GB, got {args.cap_gb:g}")
        suite = replace(suite, cap_gb=args.cap_gb)
        kept = suite.reserve_gb + suite.host_gb
        if suite.device == "cpu" and "longtune" in suite.systems and args.cap_gb <= kept:
            raise ConfigError(f"--cap-gb {args.cap_gb:g} leaves longtune's plan nothing: it keeps {suite.reserve_gb:g} "
                              f"GB of the cap for its libraries and {suite.host_gb:g} GB as its host tier; give more "
                              f"than {kept:g}, or --systems without longtune")
    return suite


def _check_out(out: Path) -> None:
    """The results file can be written: not a folder, in a folder this process can write to (made if missing)."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the JSON file to write, e.g. {out / 'bench.json'}")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"--out {out}: {above} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write to {out.parent}: {e.strerror or e}") from None


def run(args: argparse.Namespace, isolated_env: Callable[..., dict[str, str]]) -> int:
    """`longtune bench` (launch/cli.py). `isolated_env(**extra)`: the environment of a Python child that must not
    see the repo root's folders under their bare names (launch.isolation.safe_env, handed in by the command:
    launch imports bench, so bench imports nothing of launch)."""
    name = f"{args.name}-quick" if args.quick and f"{args.name}-quick" in SUITES else args.name
    suite = SUITES[name]
    suite = _checked_arguments(args, name, suite)  # all of them, before a probe runs
    if suite.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"the {name} suite needs a CUDA GPU; run `longtune bench cpu` here")
    env = environment(suite.device)
    started = datetime.datetime.now()
    out = Path(args.out) if args.out else \
        REPO / "bench" / "results" / f"{device_name(env, suite.device)}-{started.date()}-{name}.json"
    _check_out(out)  # the default one too, before the suite runs
    print(f"longtune bench {name}: {len(suite.models)} model(s) x {len(suite.systems)} systems, lengths "
          f"{suite.ladder[0]:,}..{suite.ladder[-1]:,}, " + (f"{suite.cap_gb:g} GB cap" if suite.cap_gb else "the GPU's memory"),
          flush=True)
    child_env = isolated_env(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **PROBE_ENV)  # run from the repo root
    results = run_suite(name, suite, child_env, log=lambda s: print(s, flush=True))
    print(table(results, suite))
    record = {"bench": "longtune bench", "date": started.isoformat(timespec="seconds"),
              "duration_s": (datetime.datetime.now() - started).total_seconds(), "commit": git_commit(),
              "command": " ".join(["longtune", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else
              " ".join(["python", "-m", "longtune.bench", *sys.argv[1:]]),
              "environment": {**env, "probe_env": PROBE_ENV},
              "claims": {k: v for k, v in (("process_within_plan", process_claim(results)),
                                           ("step_time_within_plan", step_claim(results))) if v}, **results}
    tmp = Path(tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")[1])
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out)
    print(f"results in {out}")
    return 0
