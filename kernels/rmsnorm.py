"""RMSNorm: a fused Triton kernel (forward and backward) beside its torch reference.

Two conventions, chosen by `offset`, each reproducing transformers exactly:

* offset == 0 (Llama, Qwen2/3, Mistral): normalise in fp32, cast the normalised
  row back to the input dtype, then multiply by the weight
  (`weight * h.to(x.dtype)`; the result dtype is the promotion of the two).
* offset != 0 (Gemma, offset=1.0): normalise and scale by `offset + weight` all
  in fp32, then cast once to the input dtype (`(h * (1 + w.float())).type_as(x)`).

The forward kernel runs one program per row and stores each row's 1/rms (fp32)
for the backward. The backward kernel runs a fixed number of programs, each over
a contiguous block of rows: it writes dX row by row and accumulates its share of
dW in fp32 registers, storing one partial dW row per program; the partial rows
are summed with torch afterwards.
"""

from __future__ import annotations

import math

import torch

from .backend import launch, num_warps, use_triton

try:  # the reference must work without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

# The widest row one program handles in registers (same limit as Liger's).
MAX_FUSED_SIZE = 65536


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """Plain torch RMSNorm over the last dim, with transformers' exact casts."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:  # LlamaRMSNorm
        return weight * h.to(x.dtype)
    out = h * (offset + weight.float())  # GemmaRMSNorm (offset=1.0)
    return out.type_as(x)




def _num_backward_programs(x: torch.Tensor, n_rows: int) -> int:
    if x.is_cuda:
        n = torch.cuda.get_device_properties(x.device).multi_processor_count
    else:  # the interpreter runs programs one after another: a few suffice
        n = 4
    return backward_programs(n, n_rows)


def backward_programs(multi_processor_count: int, n_rows: int) -> int:
    """Programs of the backward kernel: one per SM, no more than rows."""
    return max(1, min(multi_processor_count, n_rows))


if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(
        Y, y_stride, X, x_stride, W, RSTD,
        n_cols, eps, offset,
        LLAMA_CASTS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols

        x = tl.load(X + row * x_stride + cols, mask=mask, other=0.0)
        x32 = x.to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)

        mean_sq = tl.sum(x32 * x32, axis=0) / n_cols
        rstd = tl.rsqrt(mean_sq + eps)
        tl.store(RSTD + row, rstd)

        h = x32 * rstd
        if LLAMA_CASTS:
            # weight * h.to(x.dtype): round the normalised row to the input dtype first.
            y = (offset + w) * h.to(x.dtype).to(tl.float32)
        else:
            y = h * (offset + w)
        tl.store(Y + row * y_stride + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY, dy_stride, DX, dx_stride, X, x_stride, W, RSTD, DW_PARTIAL, dw_stride,
        n_rows, n_cols, offset, rows_per_program,
        LLAMA_CASTS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row_start = pid.to(tl.int64) * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols

        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
        dw_acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)

        # Walk the rows by advancing the pointers (int64 offsets: rows * cols may pass 2**31).
        X += row_start * x_stride
        DY += row_start * dy_stride
        DX += row_start * dx_stride
        RSTD += row_start
        for _ in range(row_start, row_end):
            x = tl.load(X + cols, mask=mask, other=0.0)
            x32 = x.to(tl.float32)
            dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD)

            h = x32 * rstd
            if LLAMA_CASTS:
                dw_acc += dy * h.to(x.dtype).to(tl.float32)
            else:
                dw_acc += dy * h
            # y = w * x * rstd  =>  dx = rstd * dn - rstd^3 / n * sum(dn * x) * x
            dn = dy * w
            dot = tl.sum(dn * x32, axis=0)
            dx = rstd * dn - (rstd * rstd * rstd / n_cols) * dot * x32
            tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)

            X += x_stride
            DY += dy_stride
            DX += dx_stride
            RSTD += 1

        tl.store(DW_PARTIAL + pid * dw_stride + cols, dw_acc, mask=mask)


def _forward_launch(x2d: torch.Tensor, weight: torch.Tensor, eps: float, offset: float):
    """(y, rstd, grid, args, kwargs) of the forward kernel: the launcher's choices, which kernels/aot.py also
    compiles for the GPU targets (meta tensors work)."""
    n_rows, n_cols = x2d.shape
    llama = offset == 0.0
    out_dtype = torch.promote_types(x2d.dtype, weight.dtype) if llama else x2d.dtype
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2d.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    block = triton.next_power_of_2(n_cols)
    args = (y, y.stride(0), x2d, x2d.stride(0), weight, rstd, n_cols, eps, offset)
    return y, rstd, (n_rows,), args, dict(LLAMA_CASTS=llama, BLOCK_SIZE=block, num_warps=num_warps(block))


def _forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float, offset: float):
    y, rstd, grid, args, kwargs = _forward_launch(x2d, weight, eps, offset)
    if x2d.shape[0]:
        launch(_rms_norm_fwd_kernel, grid, *args, **kwargs)
    return y, rstd


def _backward_launch(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
                     n_prog: int):
    """(dx, dw_partial, grid, args, kwargs) of the backward kernel over `n_prog` programs (as _forward_launch)."""
    n_rows, n_cols = x2d.shape
    dx = torch.empty_like(x2d)
    dw_partial = torch.zeros((n_prog, n_cols), dtype=torch.float32, device=x2d.device)
    block = triton.next_power_of_2(n_cols)
    rows_per_program = math.ceil(n_rows / n_prog)
    args = (dy2d, dy2d.stride(0), dx, dx.stride(0), x2d, x2d.stride(0), weight, rstd, dw_partial, dw_partial.stride(0),
            n_rows, n_cols, offset, rows_per_program)
    return dx, dw_partial, (n_prog,), args, dict(LLAMA_CASTS=offset == 0.0, BLOCK_SIZE=block,
                                                 num_warps=num_warps(block))


def _backward(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float):
    n_prog = _num_backward_programs(x2d, x2d.shape[0])
    dx, dw_partial, grid, args, kwargs = _backward_launch(dy2d, x2d, weight, rstd, offset, n_prog)
    if x2d.shape[0]:
        launch(_rms_norm_bwd_kernel, grid, *args, **kwargs)
    dw = dw_partial.sum(dim=0).to(weight.dtype)
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm over the last dim of x (any leading shape); see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0):
        shape = x.shape
        n_cols = shape[-1]
        if weight.shape != (n_cols,):
            raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {n_cols}")
        x2d = x.contiguous().view(-1, n_cols)
        weight = weight.contiguous()
        y, rstd = _forward(x2d, weight, float(eps), float(offset))
        ctx.offset = float(offset)
        ctx.shape = shape
        ctx.save_for_backward(x2d, weight, rstd)
        return y.view(*shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.contiguous().view(-1, x2d.shape[-1])
        dx, dw = _backward(dy2d, x2d, weight, rstd, ctx.offset)
        dx = dx.view(ctx.shape) if ctx.needs_input_grad[0] else None
        dw = dw if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim: the Triton kernel where it can run, else the torch reference.

    offset=0.0 gives LlamaRMSNorm (also Qwen2/3, Mistral); offset=1.0 gives GemmaRMSNorm
    (weight stored as w, applied as 1 + w). Rows wider than MAX_FUSED_SIZE use the reference.
    """
    if x.shape[-1] <= MAX_FUSED_SIZE and use_triton(x):
        return RMSNormFunction.apply(x, weight, eps, offset)
    return rms_norm_reference(x, weight, eps, offset)
