"""GaLore's weight update in one kernel: the Adam direction of the rank-r moments, projected back and applied.

    W <- (W - step_size * scale * P(m / (sqrt(v) + eps))) * (1 - decay)

where P(N) = N @ B for a "right" basis B (r, n) and moments (m_rows, r), or B @ N for a "left" basis B (m, r)
and moments (r, n). The torch reference materialises N and the full (m, n) update, then reads and writes W
twice more; the kernel computes N tile by tile as it loads the moments, accumulates the product in fp32, and
updates W in the epilogue: one pass over W, no (m, n) temporary. The product is summed in another order than
torch's matmul, so the result equals the reference to fp32 rounding, not bit for bit.
"""

from __future__ import annotations

import torch

from .backend import launch, use_triton

try:  # the reference must work without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 16


def galore_update_reference(w: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, basis: torch.Tensor,
                            side: str, step_size: float, scale: float, eps: float, decay: float = 0.0) -> None:
    """Plain torch, in place on w (the order of GaloreAdamW's own steps)."""
    direction = exp_avg / (exp_avg_sq.sqrt() + eps)
    update = (direction @ basis if side == "right" else basis @ direction) * scale
    w.add_(update, alpha=-step_size)
    if decay:
        w.add_(w, alpha=-decay)


if triton is not None:

    @triton.jit
    def _galore_update_kernel(W, M1, M2, B, rows, cols, inner, s_w0, s_w1, s_m0, s_m1, s_b0, s_b1,
                              step_scale, eps, keep, MOMENTS_LEFT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, inner, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if MOMENTS_LEFT:  # right basis: the direction (rows, r) times B (r, cols)
                at = offs_m[:, None] * s_m0 + offs_k[None, :] * s_m1
                a_mask = (offs_m[:, None] < rows) & (offs_k[None, :] < inner)
                m1 = tl.load(M1 + at, mask=a_mask, other=0.0).to(tl.float32)
                m2 = tl.load(M2 + at, mask=a_mask, other=0.0).to(tl.float32)
                a = m1 / (tl.sqrt(m2) + eps)
                b_mask = (offs_k[:, None] < inner) & (offs_n[None, :] < cols)
                b = tl.load(B + offs_k[:, None] * s_b0 + offs_n[None, :] * s_b1, mask=b_mask, other=0.0).to(tl.float32)
            else:  # left basis: B (rows, r) times the direction (r, cols)
                a_mask = (offs_m[:, None] < rows) & (offs_k[None, :] < inner)
                a = tl.load(B + offs_m[:, None] * s_b0 + offs_k[None, :] * s_b1, mask=a_mask, other=0.0).to(tl.float32)
                bt = offs_k[:, None] * s_m0 + offs_n[None, :] * s_m1
                b_mask = (offs_k[:, None] < inner) & (offs_n[None, :] < cols)
                m1 = tl.load(M1 + bt, mask=b_mask, other=0.0).to(tl.float32)
                m2 = tl.load(M2 + bt, mask=b_mask, other=0.0).to(tl.float32)
                b = m1 / (tl.sqrt(m2) + eps)
            acc += tl.dot(a, b, input_precision="ieee")  # no TF32: the update is the reference's to fp32 rounding
        w_at = offs_m[:, None] * s_w0 + offs_n[None, :] * s_w1
        w_mask = (offs_m[:, None] < rows) & (offs_n[None, :] < cols)
        w = tl.load(W + w_at, mask=w_mask, other=0.0).to(tl.float32)
        w = (w - step_scale * acc) * keep
        tl.store(W + w_at, w.to(W.dtype.element_ty), mask=w_mask)


def galore_update(w: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, basis: torch.Tensor, side: str,
                  step_size: float, scale: float, eps: float, decay: float = 0.0) -> None:
    """The update in place on w: the Triton kernel where it runs (a GPU, or the CPU interpreter), else torch."""
    if triton is None or not use_triton(w):
        return galore_update_reference(w, exp_avg, exp_avg_sq, basis, side, step_size, scale, eps, decay)
    grid, args, kwargs = _launch(w, exp_avg, exp_avg_sq, basis, side, step_size, scale, eps, decay)
    launch(_galore_update_kernel, grid, *args, **kwargs)


def _launch(w: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, basis: torch.Tensor, side: str,
            step_size: float, scale: float, eps: float, decay: float):
    """(grid, args, kwargs) of _galore_update_kernel: the launcher's choices, which kernels/aot.py also compiles
    for the GPU targets (meta tensors work)."""
    rows, cols = w.shape
    inner = exp_avg.shape[1] if side == "right" else exp_avg.shape[0]
    if exp_avg.stride() != exp_avg_sq.stride():
        exp_avg_sq = exp_avg_sq.contiguous()
        exp_avg = exp_avg.contiguous()
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(cols, BLOCK_N))
    args = (w, exp_avg, exp_avg_sq, basis, rows, cols, inner, w.stride(0), w.stride(1), exp_avg.stride(0),
            exp_avg.stride(1), basis.stride(0), basis.stride(1), step_size * scale, eps, 1.0 - decay)
    return grid, args, dict(MOMENTS_LEFT=side == "right", BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
