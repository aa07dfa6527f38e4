"""SwiGLU's gating product silu(gate) * up: a fused Triton kernel beside its torch reference.

The forward computes silu in fp32, rounds it to the gate's dtype and multiplies by
`up`, which reproduces `F.silu(gate) * up` (transformers' `act_fn(gate_proj(x)) *
up_proj(x)`) bit for bit in fp16/bf16: the product of two 16-bit values is exact in
fp32, so one rounding on store equals torch's rounding. The backward saves only
gate and up and recomputes sigmoid/silu from them (no extra activation is kept):

    d_gate = dy * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    d_up   = dy * silu(g)       (silu rounded to the gate dtype, as in the forward)

Unlike Liger, the gradients go to fresh tensors rather than overwriting the saved
gate/up in place, so inputs that are used elsewhere stay intact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import launch, use_triton

try:  # the reference must work without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

BLOCK_SIZE = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain torch: silu(gate) * up."""
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(G, U, Y, n_elements, BLOCK: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_elements
        g_raw = tl.load(G + offs, mask=mask, other=0.0)
        g = g_raw.to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        # F.silu rounds to the gate dtype before the product with up.
        silu = (g * tl.sigmoid(g)).to(g_raw.dtype).to(tl.float32)
        tl.store(Y + offs, (silu * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DY, G, U, DG, DU, n_elements, BLOCK: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_elements
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        g_raw = tl.load(G + offs, mask=mask, other=0.0)
        g = g_raw.to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        dg = dy * u * sig * (1.0 + g * (1.0 - sig))
        # The forward multiplied up by silu rounded to the gate dtype: differentiate that.
        du = dy * (g * sig).to(g_raw.dtype).to(tl.float32)
        tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)


def _grid(n: int):
    return (triton.cdiv(n, BLOCK_SIZE),)


def _forward_launch(gate: torch.Tensor, up: torch.Tensor, y: torch.Tensor):
    """(grid, args, kwargs) of the forward kernel over contiguous tensors: the launcher's choices, which
    kernels/aot.py also compiles for the GPU targets (meta tensors work)."""
    return _grid(gate.numel()), (gate, up, y, gate.numel()), dict(BLOCK=BLOCK_SIZE)


def _backward_launch(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, d_gate: torch.Tensor, d_up: torch.Tensor):
    """(grid, args, kwargs) of the backward kernel, as _forward_launch."""
    return _grid(gate.numel()), (dy, gate, up, d_gate, d_up, gate.numel()), dict(BLOCK=BLOCK_SIZE)


class SwiGLUFunction(torch.autograd.Function):
    """Triton silu(gate) * up, elementwise over same-shaped tensors of any shape."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor):
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
        gate = gate.contiguous()
        up = up.contiguous()
        y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        if gate.numel():
            grid, args, kwargs = _forward_launch(gate, up, y)
            launch(_swiglu_fwd_kernel, grid, *args, **kwargs)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        d_gate = torch.empty_like(gate)
        d_up = torch.empty_like(up)
        if gate.numel():
            grid, args, kwargs = _backward_launch(dy, gate, up, d_gate, d_up)
            launch(_swiglu_bwd_kernel, grid, *args, **kwargs)
        return (d_gate if ctx.needs_input_grad[0] else None, d_up if ctx.needs_input_grad[1] else None)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the Triton kernel where it can run, else the torch reference.

    Broadcasting (gate and up of different shapes) is left to the reference.
    """
    if gate.shape == up.shape and use_triton(gate):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)
