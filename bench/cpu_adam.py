"""Elements/s of the CPU AdamW step (CpuAdamW, each available backend) against torch.optim.AdamW(foreach=True).

    python bench/cpu_adam.py                                # 100M fp32 elements in 32 tensors, median of 9 steps
    python bench/cpu_adam.py --elements 20_000_000 --steps 9 --threads 1

One set of fp32 params, grads and moments, split into --tensors equal tensors (a
model's layers, roughly), is stepped by each implementation in turn: a warm-up
step, then the median of --steps timed steps. torch.optim rows step the same
params through their own state. The DeepSpeed row appears only when its cpu_adam
op is already built (never compiles; build it once with CpuAdamW("deepspeed")).
Each of our backends is also run from a worker thread, as the trainer runs it
during backward, while the main thread naps 0.5 ms at a time in Python and
records its longest gap between naps: about the longest time the step held the
GIL. A step streams 28 bytes per element, and its time moves with whatever else
the machine runs: the load average and OMP_WAIT_POLICY (PASSIVE unless set) go
into the JSON. Writes the rows, with the device, date, commit and command, to
bench/results/cpu_adam-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

# Idle OpenMP threads spin by default. On a shared machine the spinning teams take the cores
# the timed step needs: on 2 busy cores the same main-thread step measured 0.05-0.3 s from run
# to run (a plain C + libgomp loop shows it too). PASSIVE makes the numbers repeatable; set
# OMP_WAIT_POLICY yourself to measure the spinning default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP setting: libgomp reads it once, when torch loads it)

from longtune.offload.cpu_adam import AdamWHyper, CpuAdamW, deepspeed_cpu_adam_built  # noqa: E402
from longtune.bench.provenance import git_commit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HYPER = AdamWHyper(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def timed_steps(step, n: int) -> list[float]:
    step(0)  # warm-up: first touch of the optimizer's own state, OpenMP pool start
    times = []
    for k in range(1, n + 1):
        start = time.perf_counter()
        step(k)
        times.append(time.perf_counter() - start)
    return times


def with_stall_probe(fn):
    """Run fn in a worker thread; return (fn's seconds, longest gap between the main thread's loop turns)."""
    done = threading.Event()
    took = []

    def work():
        start = time.perf_counter()
        fn()
        took.append(time.perf_counter() - start)
        done.set()

    worker = threading.Thread(target=work)
    last, stall = time.perf_counter(), 0.0
    worker.start()
    # Sleeping, not spinning: a spinning main thread would take a core from the step's OpenMP team.
    # Waking from sleep needs the GIL, so a gap much longer than the nap is the GIL held.
    while not done.is_set():
        time.sleep(0.0005)
        now = time.perf_counter()
        stall, last = max(stall, now - last), now
    worker.join()
    return took[0], stall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elements", type=int, default=100_000_000)
    ap.add_argument("--tensors", type=int, default=32)
    ap.add_argument("--steps", type=int, default=9, help="timed steps per implementation (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = cpu_name()
    per = args.elements // args.tensors
    print(f"CPU AdamW step: {per * args.tensors:,} fp32 elements in {args.tensors} tensors, on {device}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(per, generator=g) for _ in range(args.tensors)]
    grads = [torch.randn(per, generator=g) for _ in range(args.tensors)]
    numel = per * args.tensors

    impls = {
        "torch.optim.AdamW(foreach=True)": ("optim", dict(foreach=True)),
        "torch.optim.AdamW(foreach=False)": ("optim", dict(foreach=False)),
        "torch.optim.AdamW(fused=True)": ("optim", dict(fused=True)),
    }
    backends = ["torch"] + (["deepspeed"] if deepspeed_cpu_adam_built() else [])
    for b in backends:
        impls[f"CpuAdamW({b!r})"] = ("ours", b)

    rows = []
    print(f"\n{'implementation':>34} {'median s':>9} {'min s':>7} {'Gelem/s':>8} {'vs foreach':>10}")
    for name, (kind, what) in impls.items():
        if kind == "optim":
            leaves = [p.requires_grad_() for p in params]
            for p, gr in zip(leaves, grads):
                p.grad = gr
            opt = torch.optim.AdamW(leaves, lr=HYPER.lr, betas=HYPER.betas, eps=HYPER.eps,
                                    weight_decay=HYPER.weight_decay, **what)
            with torch.no_grad():
                times = timed_steps(lambda k: opt.step(), args.steps)
            del opt
            for p in leaves:
                p.grad = None
                p.requires_grad_(False)
            row = dict(implementation=name)
        else:
            adam = CpuAdamW(what)
            exp_avgs = [torch.zeros(per) for _ in params]
            exp_avg_sqs = [torch.zeros(per) for _ in params]

            def step(k):
                adam.step(params, grads, exp_avgs, exp_avg_sqs, k + 1, HYPER)

            times = timed_steps(step, args.steps)
            thread_s, stall_s = with_stall_probe(lambda: step(args.steps + 1))
            row = dict(implementation=name, backend=adam.backend_name, worker_thread_s=thread_s,
                       main_thread_max_stall_s=stall_s)
            adam.close()
            del exp_avgs, exp_avg_sqs
        med = statistics.median(times)
        row.update(step_s=times, median_s=med, elements_per_s=numel / med)
        rows.append(row)

    base = next(r for r in rows if r["implementation"] == "torch.optim.AdamW(foreach=True)")
    for r in rows:
        r["speedup_vs_foreach"] = base["median_s"] / r["median_s"]
        print(f"{r['implementation']:>34} {r['median_s']:9.3f} {min(r['step_s']):7.3f} {r['elements_per_s'] / 1e9:8.2f} "
              f"{r['speedup_vs_foreach']:9.2f}x" + (f"  [goal >= 3x: {'met' if r['speedup_vs_foreach'] >= 3 else 'NOT met'}]"
                                                   if "backend" in r else ""))
    print(f"\n{'from a worker thread':>34} {'step s':>9} {'main-thread max stall s':>24}")
    for r in rows:
        if "backend" in r:
            print(f"{r['implementation']:>34} {r['worker_thread_s']:9.3f} {r['main_thread_max_stall_s']:24.4f}")

    date = datetime.date.today().isoformat()
    commit = git_commit()
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"cpu_adam-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        bench="cpu_adam", device=device, date=date, commit=commit,
        command="python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
        elements=numel, tensors=args.tensors, steps=args.steps, hyper=dict(vars(HYPER)),
        omp_wait_policy=os.environ["OMP_WAIT_POLICY"], load_average=os.getloadavg(), rows=rows,
    ), indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
