"""The dry run of the bundled configs at full size, beside the plan: no GPU needed.

    python bench/dry_run.py                       # the six cases below, ~25 min on 2 cores
    python bench/dry_run.py --cases 8b-128k       # one of them

Each case is `longtune plan CFG --dry-run --json` in its own process (h100-pcie5 profile, budget 70 GB): one
training step of the plan on meta and fake tensors (trainer/dry_run.py). Per case it prints the GPU peak, the
host peak and the saved activations on the GPU, the dry run's beside the plan's, and the ratio; the claim
checked: the GPU peak within 5% of the plan's and inside the budget. The longest-context case first asks
`longtune plan --longest` for the length. Writes bench/results/dry_run-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from longtune.bench.provenance import REPO, git_commit

NVME = ["memory.nvme_path={nvme}"]
CASES = {
    "8b-128k": ["llama3-8b-128k"],
    "8b-longest": ["llama3-8b-128k", *NVME],  # data.seq_len: what --longest finds
    # the same with the solver placing the optimizer state and the weights (issue 25: past a million tokens)
    "8b-longest-auto": ["llama3-8b-128k", "memory.optimizer=auto", "memory.params=auto", *NVME],
    # prefetch depth 0 (one layer's staging/prefetch buffers), the solver placing the state: past 1.5M on one GPU
    "8b-longest-depth0": ["llama3-8b-128k", "memory.optimizer=auto", "memory.params=auto", "memory.prefetch_depth=0",
                          *NVME],
    "70b-128k": ["llama3-70b-128k", *NVME],
    "8b-1m-sp8": ["llama3-8b-128k", "parallel.sequence_parallel=8", "data.seq_len=1048576",
                  "model.config.max_position_embeddings=1048576", "data.passkey.eval_samples=0",
                  "memory.optimizer=nvme", *NVME],  # the Adam state (16 B a parameter) does not fit 1/8 of the host
}


def longtune(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    return subprocess.run([sys.executable, "-m", "longtune.launch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def longest(args: list[str], work: str) -> int:
    out = longtune("plan", *args, "--longest", "--json", "--out", f"{work}/longest.yaml")
    return json.loads(out.stdout.strip().splitlines()[-1])["longest_context"]["seq_len"]


def run(name: str, work: str) -> dict:
    nvme = Path(work) / f"nvme-{name}"
    nvme.mkdir()
    args = [a.format(nvme=nvme) for a in CASES[name]]
    if name.startswith("8b-longest"):
        n = longest(args, work)
        args += [f"data.seq_len={n}", f"model.config.max_position_embeddings={max(n, 131072)}"]
    start = time.perf_counter()
    out = longtune("plan", *args, "--dry-run", "--json", "--out", f"{work}/{name}.yaml")
    row = {"case": name, "args": args, "exit": out.returncode, "wall_s": round(time.perf_counter() - start, 1)}
    if out.returncode not in (0, 3):
        return {**row, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "no output"}
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    dry = plan["dry_run"]
    row |= {"budget_bytes": plan["inputs"]["budget_bytes"], **dry}
    gpu = dry["bytes"]["GPU peak"]
    row["gpu_ratio"] = gpu["dry_run"] / gpu["plan"]
    row["claim_holds"] = abs(row["gpu_ratio"] - 1) <= 0.05 and gpu["dry_run"] <= row["budget_bytes"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--out", default=None, help="results file (default bench/results/dry_run-<date>.json)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="longtune-dry-") as work:
        for name in args.cases.split(","):
            row = run(name, work)
            rows.append(row)
            if "error" in row:
                print(f"{name:<12} error: {row['error']}", flush=True)
                continue
            cells = "  ".join(f"{what} {v['dry_run'] / 1e9:.2f}/{v['plan'] / 1e9:.2f} GB "
                              f"({(v['dry_run'] / v['plan'] - 1) * 100 if v['plan'] else 0:+.1f}%)"
                              for what, v in row["bytes"].items())
            print(f"{name:<12} dry run/plan: {cells}  {row['wall_s']:.0f} s  "
                  f"{'within 5%, inside the budget' if row['claim_holds'] else 'CLAIM FAILS'}", flush=True)
    date = datetime.date.today().isoformat()
    path = Path(args.out or REPO / "bench" / "results" / f"dry_run-{date}.json")
    path.write_text(json.dumps({"bench": "dry_run", "date": date, "commit": git_commit(),
                                "command": "python bench/dry_run.py " + " ".join(sys.argv[1:]), "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0 if all(r.get("claim_holds") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
