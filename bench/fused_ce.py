"""Peak memory and time of the fused linear + CE loss against F.cross_entropy(hidden @ W.T, labels).

    python bench/fused_ce.py                                   # 16K tokens, hidden 2048, vocab 128256
    python bench/fused_ce.py --tokens 8192 --chunk-size 1024

Each measurement (forward + backward of one implementation at one size) runs in
its own subprocess, so peaks do not mix. On a GPU: the Triton path in bf16,
peak = torch.cuda.max_memory_allocated() minus what the inputs hold, time = the
mean of --reps runs after a warm-up. On the CPU: the chunked torch reference in
fp32 (the Triton interpreter is far too slow at this size), peak = ru_maxrss
after the run minus ru_maxrss once the inputs are allocated, one run timed.

On the CPU the naive run needs about 3 x tokens x vocab x 4 bytes (logits,
log-softmax, and its gradient pair in the backward): 25 GB at the default size.
Its subprocess runs under an address-space limit (what the machine has
available, less a margin) so that not fitting ends in a clean allocation error
instead of the kernel's OOM killer; the sizes are then halved until the naive
run fits, and both implementations are measured there too. Writes everything,
with the device, date, commit and command, to bench/results/fused_ce-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from longtune.bench.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- child


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def child(args) -> dict:
    import torch

    from longtune.kernels import fused_ce as fc

    if args.margin_gb is not None:
        # Address space = what is mapped now + the memory still available, less a margin: going past it
        # is a clean "can't allocate memory" here rather than the OOM killer picking some process.
        limit = _vm_size_bytes() + mem_available() - int(args.margin_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype)
    out = dict(impl=args.impl, tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype)
    stage = ["allocating the inputs"]
    try:
        g = torch.Generator(device=args.device).manual_seed(0)
        # No temporaries while building the inputs: ru_maxrss would remember them.
        hidden = torch.randn(args.tokens, args.hidden, generator=g, device=args.device, dtype=dtype).requires_grad_()
        weight = torch.randn(args.vocab, args.hidden, generator=g, device=args.device, dtype=dtype).mul_(0.02).requires_grad_()
        labels = torch.randint(0, args.vocab, (args.tokens,), generator=g, device=args.device)
        labels[::10] = -100

        if args.impl == "naive":
            out["path"] = "naive (full logits)"

            def step():
                return torch.nn.functional.cross_entropy(hidden @ weight.T, labels)
        else:
            fn = fc.fused_linear_cross_entropy if cuda else fc.fused_linear_cross_entropy_reference
            out["path"] = "triton" if cuda and fc.use_triton(hidden) else "torch reference (chunked)"
            chunk = out["chunk_size"] = args.chunk_size or fc.default_chunk_size(args.tokens, args.hidden, args.vocab)

            def step():
                return fn(hidden, weight, labels, chunk_size=chunk)

        def run_once():
            hidden.grad = weight.grad = None
            stage[0] = "forward"
            t0 = time.perf_counter()
            loss = step()
            if cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            stage[0] = "backward"
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            return loss.item(), t1 - t0, time.perf_counter() - t0

        if cuda:
            run_once()  # warm-up: Triton compiles, cuBLAS picks its kernels
            hidden.grad = weight.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            runs = [run_once() for _ in range(args.reps)]
            out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
            out["baseline_bytes"] = base
        else:
            base, rss0 = _maxrss_bytes(), _rss_bytes()
            runs = [run_once()]
            out["peak_bytes"] = _maxrss_bytes() - base
            out["baseline_bytes"], out["baseline_rss_bytes"] = base, rss0
    except (RuntimeError, MemoryError) as e:  # the allocator's "can't allocate memory", CUDA OOM
        msg = str(e).splitlines()[0]
        if "can't allocate memory" in msg or "out of memory" in msg.lower():
            msg = "out of memory" + (f" ({msg.split('you tried to allocate ')[1].split('.')[0]})" if "tried to allocate" in msg else "")
        out["error"] = f"{stage[0]}: {msg[:300]}"
        return out
    out["loss"] = runs[-1][0]
    out["fwd_s"] = sum(r[1] for r in runs) / len(runs)
    out["fwd_bwd_s"] = sum(r[2] for r in runs) / len(runs)
    return out


# ------------------------------------------------------------------------------------ parent


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def measure(impl: str, tokens: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--tokens", str(tokens), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab), "--device", args.device, "--dtype", args.dtype, "--reps", str(args.reps)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CPU runs the torch reference, never the interpreter
    if args.device == "cpu":
        cmd += ["--margin-gb", str(1.0 if args.margin_gb is None else args.margin_gb)]
    print(f"  {impl:>5} @ {tokens} tokens ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(impl=impl, tokens=tokens, error=f"child exited {proc.returncode}: {' | '.join(tail)}")


def gb(b) -> str:
    return f"{b / 1e9:8.2f}" if b is not None else "       -"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--chunk-size", type=int, default=None, help="fused chunk tokens (default: the kernel's)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs on cuda (one on cpu)")
    ap.add_argument("--min-tokens", type=int, default=2048, help="stop halving below this")
    ap.add_argument("--margin-gb", type=float, default=None, help="cpu: memory left to the rest of the machine (1)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", choices=("fused", "naive"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.impl = args.child
        print(json.dumps(child(args)))
        return

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.device == "cpu":
        args.reps = 1
        device_name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    else:
        device_name = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    print(f"fused linear CE vs naive: hidden {args.hidden}, vocab {args.vocab}, {args.dtype} on {device_name}")

    rows = []
    tokens = args.tokens
    while True:
        fused, naive = measure("fused", tokens, args), measure("naive", tokens, args)
        rows.append(dict(tokens=tokens, fused=fused, naive=naive))
        if "error" not in naive or tokens // 2 < args.min_tokens:
            break
        print(f"  naive did not fit at {tokens} tokens ({naive['error']}); halving")
        tokens //= 2

    fits = [r for r in rows if "error" not in r["naive"]]
    for r in rows:  # naive peaks grow linearly with the tokens: an estimate where it did not fit
        if "error" in r["naive"] and fits:
            ref = fits[-1]["naive"]
            r["naive_peak_estimate_bytes"] = ref["peak_bytes"] * r["tokens"] / ref["tokens"]

    print(f"\n{'tokens':>7} {'impl':>6} {'peak GB':>8} {'fwd s':>8} {'fwd+bwd s':>9} {'loss':>9}  path / error")
    for r in rows:
        for impl in ("fused", "naive"):
            m = r[impl]
            if "error" in m:
                print(f"{r['tokens']:>7} {impl:>6} {'-':>8} {'-':>8} {'-':>9} {'-':>9}  {m['error']}")
            else:
                print(f"{r['tokens']:>7} {impl:>6} {gb(m['peak_bytes'])} {m['fwd_s']:8.2f} {m['fwd_bwd_s']:9.2f} "
                      f"{m['loss']:9.5f}  {m['path']}" + (f", chunk {m['chunk_size']}" if impl == "fused" else ""))
        f, n = r["fused"], r["naive"]
        if "naive_peak_estimate_bytes" in r and "error" not in f:
            est = r["naive_peak_estimate_bytes"]
            print(f"{r['tokens']:>7}  naive would need ~{est / 1e9:.1f} GB (extrapolated from {fits[-1]['tokens']} tokens); "
                  f"fused/naive peak ~1/{est / f['peak_bytes']:.0f}")
        if "error" not in f and "error" not in n:
            r["peak_ratio"] = f["peak_bytes"] / n["peak_bytes"]
            r["time_ratio"] = f["fwd_bwd_s"] / n["fwd_bwd_s"]
            r["loss_abs_diff"] = abs(f["loss"] - n["loss"])
            print(f"{r['tokens']:>7}  fused/naive: peak {r['peak_ratio']:.3f} (1/{1 / r['peak_ratio']:.1f}), "
                  f"time {r['time_ratio']:.2f}x, |loss diff| {r['loss_abs_diff']:.2e}"
                  f"  [goal: peak <= 1/8: {'met' if r['peak_ratio'] <= 1 / 8 else 'NOT met'}]")

    date = datetime.date.today().isoformat()
    commit = git_commit()
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"fused_ce-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        bench="fused_ce", device=device_name, date=date, commit=commit,
        command="python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
        peak_memory=("torch.cuda.max_memory_allocated minus the inputs" if args.device == "cuda"
                     else "ru_maxrss after forward+backward minus ru_maxrss once the inputs exist"),
        requested=dict(tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype),
        rows=rows,
    ), indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
