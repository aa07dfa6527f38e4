"""Solve time and gap of the schedule MILP for 8B, 70B and 405B architectures at 32K-1M tokens.

    python bench/planner_solve.py                       # HiGHS, the default solver
    python bench/planner_solve.py --solvers HiGHS,PULP_CBC_CMD --time-limit 30

Prints one row per (architecture, tokens, solver): an infeasible row shows in the
GPU column the smallest budget that would fit ("needs"). Writes the rows, with the
machine, date, commit and command, to bench/results/planner_solve-<date>.json.
Budget: memory.budget_gb=70 on the bundled h100-pcie5 profile; for 8B the optimizer state
on the host, for 70B and 405B the solver places state and weights (their Adam state does not
fit the profile's 768 GB of host RAM); loss chunked by 8192.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

from longtune.planner.arena import plan_arena
from longtune.planner.milp import SolverError, min_gpu_budget, solve_schedule
from longtune.planner.evaluate import evaluate
from longtune.planner.problem import Machine, ModelShape, build_problem
from longtune.bench.provenance import git_commit

ARCHS = {
    "8B": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "70B": dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
    "405B": dict(num_hidden_layers=126, hidden_size=16384, intermediate_size=53248, num_attention_heads=128, num_key_value_heads=8),
}
TOKENS = [32768, 131072, 524288, 1048576]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solvers", default="HiGHS")
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--gap", type=float, default=0.01)
    ap.add_argument("--budget-gb", type=float, default=70.0)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    machine = Machine.load("h100-pcie5")
    rows = []
    print(f"{'arch':>5} {'tokens':>9} {'solver':>13} {'status':>11} {'solve s':>8} {'gap':>7} {'step s':>9} {'gpu GB':>7} "
          f"{'host GB':>8} {'nvme GB':>8} {'arena s':>8} {'arena gap':>9}")
    for arch, dims in ARCHS.items():
        shape = ModelShape.from_hf_config({"model_type": "llama", "vocab_size": 128256, **dims}, "bfloat16")
        for tokens in TOKENS:
            state = {"optimizer": "cpu", "params": "gpu"} if arch == "8B" else {"optimizer": "auto", "params": "auto"}
            problem = build_problem(shape, tokens, machine, args.budget_gb * 1e9, chunks=args.chunks,
                                    loss_chunk_tokens=8192, **state)
            for solver in args.solvers.split(","):
                start = time.perf_counter()
                try:
                    solution = solve_schedule(problem, solver, args.time_limit, args.gap)
                except SolverError:
                    solution = None  # nothing found inside the time limit
                elapsed = time.perf_counter() - start
                row = {"arch": arch, "tokens": tokens, "solver": solver, "status": solution.status if solution else "no solution",
                       "solve_s": elapsed, "gap": solution.gap if solution else None}
                if solution is None:
                    pass
                elif solution.decisions:
                    ev = evaluate(problem, solution.decisions, solution.state)
                    arena = plan_arena(problem, solution.decisions)
                    row.update(step_time_s=ev.step_time_s, gpu_peak_bytes=ev.gpu_peak_bytes, tier_bytes=ev.tier_bytes,
                               arena_s=arena.solve_s, arena_gap=arena.gap, arena_method=arena.method, state=solution.state)
                else:
                    try:
                        row["min_budget_bytes"] = min_gpu_budget(problem, solver, args.time_limit)
                    except SolverError as e:  # TiersTooSmall: no GPU budget would do
                        row["status"], row["reason"] = "tiers", str(e)
                rows.append(row)
                tiers = row.get("tier_bytes", {})
                gap = f"{row['gap']:.2%}" if row["gap"] is not None else "-"
                step = f"{row['step_time_s']:9.2f}" if "step_time_s" in row else f"{'needs' if 'min_budget_bytes' in row else '-':>9}"
                gpu_bytes = row.get("gpu_peak_bytes", row.get("min_budget_bytes"))
                gpu = f"{gpu_bytes / 1e9:7.1f}" if gpu_bytes else f"{'-':>7}"
                arena_s = f"{row['arena_s']:8.2f}" if "arena_s" in row else f"{'-':>8}"
                arena_gap = f"{row['arena_gap']:9.2%}" if "arena_gap" in row else f"{'-':>9}"
                print(f"{arch:>5} {tokens:>9,} {solver:>13} {row['status']:>11} {elapsed:8.2f} {gap:>7} {step} {gpu} "
                      f"{tiers.get('host', 0) / 1e9:8.1f} {tiers.get('nvme', 0) / 1e9:8.1f} {arena_s} {arena_gap}", flush=True)
    date = datetime.date.today().isoformat()
    commit = git_commit()
    out = Path(args.out or Path(__file__).parent / "results" / f"planner_solve-{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": f"CPU: {platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "date": date, "commit": commit, "command": " ".join([sys.executable.rsplit('/', 1)[-1], *sys.argv]),
        "budget_gb": args.budget_gb, "chunks": args.chunks, "gap": args.gap, "rows": rows,
    }, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
