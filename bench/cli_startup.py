"""How fast the CLI answers: `longtune --help`, a config error and `longtune plan` (an inline config and the quick
start's GGUF model) beside `python -c pass`.

    python bench/cli_startup.py                # 15 runs of each, medians
    python bench/cli_startup.py --runs 30

Each command runs as its own process, as a user starts it (the `longtune` console script of this environment), after
one untimed warm-up run. Prints the median and the best wall time of each, and its ratio to `python -c pass`,
and whether torch was imported (python -X importtime). Writes the rows, with machine, date, commit and command,
to bench/results/cli_startup-<date>.json. The goal: `longtune --help` under 0.5 s on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from longtune.bench.provenance import REPO, git_commit


def commands(longtune: list[str], scratch: Path) -> dict[str, list[str]]:
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "longtune --help": [*longtune, "--help"],
        "longtune train --help": [*longtune, "train", "--help"],
        "longtune train (config error)": [*longtune, "train", "train.max_steps=true"],
        "longtune train --print-config": [*longtune, "train", "--print-config"],
        "longtune plan llama3-8b-128k": [*longtune, "plan", "llama3-8b-128k", "--out", str(scratch / "plan.yaml")],
        "longtune plan quickstart (GGUF)": [*longtune, "plan", "quickstart", "memory.budget_gb=3", "--out",
                                            str(scratch / "plan-q.yaml")],
    }


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def imports_torch(cmd: list[str]) -> bool:
    """Whether the command imports torch (python -X importtime lists every module imported)."""
    script = [] if cmd[0] == sys.executable else ["-m", "longtune.launch.cli"]
    err = subprocess.run([sys.executable, "-X", "importtime", *script, *cmd[1:]], cwd=REPO, capture_output=True,
                         text=True).stderr
    return any(line.rstrip().endswith("| torch") for line in err.splitlines())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    script = shutil.which("longtune", path=str(Path(sys.executable).parent))
    longtune = [script] if script else [sys.executable, "-m", "longtune.launch.cli"]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        cmds = commands(longtune, Path(scratch))
        base = None
        print(f"{'command':<32} {'median s':>9} {'best s':>7} {'x python':>9} {'torch':>6}")
        for name, cmd in cmds.items():
            wall(cmd)  # warm the page cache
            times = [wall(cmd) for _ in range(args.runs)]
            median = statistics.median(times)
            base = base or median
            torch = imports_torch(cmd)
            rows.append({"command": name, "argv": [os.path.basename(cmd[0]), *cmd[1:]], "median_s": round(median, 4),
                         "best_s": round(min(times), 4), "ratio_to_python": round(median / base, 2), "imports_torch": torch})
            print(f"{name:<32} {median:>9.3f} {min(times):>7.3f} {median / base:>9.1f} {str(torch):>6}")
    help_row = next(r for r in rows if r["command"] == "longtune --help")
    verdict = "under" if help_row["median_s"] < 0.5 else "OVER"
    print(f"longtune --help: {help_row['median_s']:.3f} s median, {verdict} the 0.5 s goal")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"cli_startup-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bench": "cli_startup", "date": str(datetime.date.today()), "commit": git_commit(),
        "command": "python bench/cli_startup.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "runs": args.runs, "rows": rows,
    }, indent=2) + "\n")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
