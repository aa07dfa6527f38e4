"""Each Triton kernel of kernels/ against its torch reference: time, peak memory and agreement, side by side.

    python bench/kernel_speed.py                      # a GPU: bf16 at Llama-3-8B layer sizes, 16K tokens
    python bench/kernel_speed.py --tokens 32768 --reps 20
    TRITON_INTERPRET=1 python bench/kernel_speed.py --small --allow-cpu   # plumbing on a CPU (interpreter, fp32)

Per kernel, forward + backward (GaLore's update: the in-place update alone) of the Triton path and of the torch
reference on the same inputs: the median of --reps timed runs after --warmup untimed ones (the first compiles),
CUDA events on a GPU and wall time on the CPU; the peak memory a run allocates above its inputs
(torch.cuda.max_memory_allocated; 0 on the CPU); and the largest difference of any output or gradient over the
reference's largest magnitude. The fused linear + cross-entropy is set beside two references: the same chunk loop
with the CE in torch (`fused_linear_cross_entropy_reference`) and the full logits + F.cross_entropy (`naive`,
what transformers does). `speedup` is reference time / Triton time.

Sizes (the default, --tokens 16384): RMSNorm [T, 4096]; SwiGLU [T, 14336]; RoPE q [1, 32, T, 128] and
k [1, 8, T, 128] as transformers makes them (transposed views); fused CE hidden [T, 4096] and a 128256-token
vocabulary; GaLore's update of a 4096 x 14336 weight (right basis) and a 14336 x 4096 one (left), rank 128, fp32.
Writes one JSON (--json, else bench/results/kernel_speed-<date>.json) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device, reps: int, warmup: int) -> dict:
    """Median time of fn() and the peak memory one call allocates beyond what was allocated before it."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    cuda = device.type == "cuda"
    peak = 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return {"ms": statistics.median(times) * 1e3, "peak_gb": peak / GB}


def rel_err(got, ref) -> float:
    """max |got - ref| / max |ref| over tensors (0 when both are empty)."""
    worst = 0.0
    for a, b in zip(got, ref):
        if a is None or b is None:
            continue
        scale = b.float().abs().max().item() or 1.0
        worst = max(worst, (a.float() - b.float()).abs().max().item() / scale)
    return worst


def fwd_bwd(fn, inputs: list, grad_out: Optional[list] = None):
    """fn(*inputs) forward and backward (grad_out: the outputs' gradients; None for a scalar loss); returns
    (outputs, input gradients)."""
    import torch

    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grad_out)
    return [o.detach() for o in outs], [t.grad for t in inputs]


def sizes(small: bool, tokens: int) -> dict:
    if small:
        return dict(tokens=64, hidden=64, inter=128, heads=4, kv_heads=2, head_dim=16, vocab=512,
                    galore=((64, 96, 8), (96, 64, 8)))
    return dict(tokens=tokens, hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256,
                galore=((4096, 14336, 128), (14336, 4096, 128)))


def run(args) -> dict:
    import torch

    from longtune.kernels import fused_ce as fc
    from longtune.kernels.backend import interpreting, use_triton
    from longtune.kernels.galore_update import galore_update, galore_update_reference
    from longtune.kernels.rmsnorm import RMSNormFunction, rms_norm_reference
    from longtune.kernels.rope import RoPEFunction, apply_rope_reference
    from longtune.kernels.swiglu import SwiGLUFunction, swiglu_reference

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    sz = sizes(args.small, args.tokens)
    T, H, I = sz["tokens"], sz["hidden"], sz["inter"]
    gen = torch.Generator(device=device).manual_seed(0)
    triton_here = use_triton(torch.empty(0, device=device))
    rows = []

    def randn(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dt)

    def bench(name: str, shape: str, triton_fn, refs: dict[str, Callable], compare: Callable):
        """triton_fn / refs[...]: zero-argument closures returning (outputs, grads) for the comparison."""
        row = {"kernel": name, "shape": shape, "dtype": str(dtype).replace("torch.", "")}
        if not triton_here:
            row.update(ok=False, error="Triton cannot run here (no GPU, TRITON_INTERPRET is not 1)")
            rows.append(row)
            print(json.dumps(row), flush=True)
            return
        try:
            row["triton"] = measure(triton_fn, device, args.reps, args.warmup)
            got = triton_fn()
            for ref_name, ref_fn in refs.items():
                row[ref_name] = measure(ref_fn, device, args.reps, args.warmup)
                row[ref_name]["speedup"] = row[ref_name]["ms"] / row["triton"]["ms"]
                row[ref_name]["max_rel_err"] = compare(got, ref_fn())
            row["ok"] = True
        except Exception as e:  # noqa: BLE001 -- one kernel failing is a row, not the end of the bench
            import traceback

            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                       traceback=traceback.format_exc().splitlines()[-20:])
        rows.append(row)
        print(json.dumps(row), flush=True)

    def flat(pair):
        outs, grads = pair
        return [*outs, *grads]

    def cmp(a, b):
        return rel_err(flat(a), flat(b))

    # RMSNorm
    x, w = randn(T, H).requires_grad_(), (1 + randn(H, scale=0.1)).requires_grad_()
    dy = randn(T, H)
    bench("rmsnorm", f"[{T}, {H}]",
          lambda: fwd_bwd(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), [x, w], [dy]),
          {"torch": lambda: fwd_bwd(lambda a, b: rms_norm_reference(a, b, 1e-6), [x, w], [dy])}, cmp)
    del x, w, dy

    # SwiGLU
    g, u = randn(T, I).requires_grad_(), randn(T, I).requires_grad_()
    dy = randn(T, I)
    bench("swiglu", f"[{T}, {I}]",
          lambda: fwd_bwd(SwiGLUFunction.apply, [g, u], [dy]),
          {"torch": lambda: fwd_bwd(swiglu_reference, [g, u], [dy])}, cmp)
    del g, u, dy

    # RoPE: q/k as transformers makes them, [B, S, H, D] projections viewed as [B, H, S, D]
    D, nq, nk = sz["head_dim"], sz["heads"], sz["kv_heads"]
    q = randn(1, T, nq, D).transpose(1, 2).requires_grad_()
    k = randn(1, T, nk, D).transpose(1, 2).requires_grad_()
    pos = torch.arange(T, device=device, dtype=torch.float32)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    ang = torch.cat([pos[:, None] * inv[None]] * 2, dim=-1)[None]
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    dq, dk = randn(1, nq, T, D), randn(1, nk, T, D)
    bench("rope", f"q [1, {nq}, {T}, {D}] k [1, {nk}, {T}, {D}]",
          lambda: fwd_bwd(lambda a, b: RoPEFunction.apply(a, b, cos, sin, 1), [q, k], [dq, dk]),
          {"torch": lambda: fwd_bwd(lambda a, b: apply_rope_reference(a, b, cos, sin, 1), [q, k], [dq, dk])}, cmp)
    del q, k, dq, dk

    # Fused linear + cross-entropy (the loss is a scalar; its gradients come from the forward)
    V = sz["vocab"]
    hid = randn(T, H, scale=0.5).requires_grad_()
    wt = randn(V, H, scale=0.02).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=gen, device=device)

    def ce(fn):
        return lambda: fwd_bwd(lambda a, b: fn(a, b, labels), [hid, wt], None)

    bench("fused_linear_ce", f"hidden [{T}, {H}] vocab {V}", ce(fc.fused_linear_cross_entropy),
          {"torch_chunked": ce(fc.fused_linear_cross_entropy_reference), "naive_logits": ce(fc.linear_cross_entropy_naive)},
          cmp)
    del hid, wt, labels

    # GaLore's fused update, in place on the weight (fp32: the optimizer's master weights)
    for rows_, cols, rank in sz["galore"]:
        side = "right" if rows_ < cols else "left"
        low = (rows_, rank) if side == "right" else (rank, cols)
        basis = randn(*((rank, cols) if side == "right" else (rows_, rank)), dt=torch.float32)
        m, v = randn(*low, dt=torch.float32), (randn(*low, dt=torch.float32).abs() + 0.01)
        w0 = randn(rows_, cols, dt=torch.float32)
        w_k, w_r = w0.clone(), w0.clone()

        def upd(fn, w):
            def go():
                fn(w, m, v, basis, side, 1e-3, 0.25, 1e-6, 1e-4)
                return [w], []
            return go

        def one_step(fn):
            w = w0.clone()
            fn(w, m, v, basis, side, 1e-3, 0.25, 1e-6, 1e-4)
            return [w], []

        row_start = len(rows)
        bench("galore_update", f"W [{rows_}, {cols}] rank {rank} {side}", upd(galore_update, w_k),
              {"torch": upd(galore_update_reference, w_r)}, lambda a, b: 0.0)
        if rows[row_start].get("ok"):  # agreement on one step from the same weight (the timed runs drift)
            rows[row_start]["torch"]["max_rel_err"] = rel_err(
                [one_step(galore_update)[0][0] - w0], [one_step(galore_update_reference)[0][0] - w0])
        del basis, m, v, w0, w_k, w_r

    name = torch.cuda.get_device_name() if cuda else "cpu"
    return {"bench": "kernel_speed", "device": name, "triton": triton_here, "interpreter": interpreting(),
            "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "reps": args.reps,
            "small": args.small, "rows": rows}


def table(result: dict) -> str:
    lines = [f"{'kernel':<16} {'shape':<34} {'reference':<14} {'triton ms':>10} {'ref ms':>10} {'speedup':>8} "
             f"{'triton GB':>9} {'ref GB':>8} {'rel err':>9}"]
    for row in result["rows"]:
        if not row.get("ok"):
            lines.append(f"{row['kernel']:<16} {row['shape']:<34} failed: {row.get('error')}")
            continue
        for ref in (k for k in row if isinstance(row[k], dict) and k != "triton"):
            r = row[ref]
            lines.append(f"{row['kernel']:<16} {row['shape']:<34} {ref:<14} {row['triton']['ms']:>10.3f} "
                         f"{r['ms']:>10.3f} {r['speedup']:>7.2f}x {row['triton']['peak_gb']:>9.3f} "
                         f"{r['peak_gb']:>8.3f} {r['max_rel_err']:>9.2e}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny sizes (plumbing, e.g. the CPU interpreter)")
    ap.add_argument("--allow-cpu", action="store_true", help="run without a GPU (plumbing only: the timings mean nothing)")
    ap.add_argument("--json", default=None, help="where to write the result (default bench/results/kernel_speed-<date>.json)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("bench/kernel_speed.py needs a CUDA GPU (or --allow-cpu, for plumbing)", file=sys.stderr)
        return 2
    if args.small and args.reps == 10:
        args.reps, args.warmup = 2, 1
    from longtune.bench.provenance import git_commit

    result = run(args)
    result.update(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=git_commit(),
                  command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else " ".join(argv))
    print(table(result))
    out = Path(args.json or REPO / "bench" / "results" / f"kernel_speed-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"results in {out}")
    return 0 if all(r.get("ok") for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
