"""Rotary position embedding (RoPE): a fused Triton kernel beside its torch reference.

`apply_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1)` is a drop-in for
transformers' `apply_rotary_pos_emb` as Llama, Qwen2/3 and Mistral call it:
q [batch, heads, seq, head_dim], k [batch, kv_heads, seq, head_dim] (GQA: fewer k
heads), cos/sin [batch or 1, seq, head_dim], unsqueezed at `unsqueeze_dim` to
broadcast over the heads. `position_ids` is ignored, as in transformers.

With x = [x1, x2] (the two halves of head_dim) and rotate_half(x) = [-x2, x1]:

    y = x * cos + rotate_half(x) * sin
    y1 = x1 * cos1 - x2 * sin1
    y2 = x2 * cos2 + x1 * sin2

The backward is the transpose of that linear map (for the usual cos/sin, whose two
halves are equal, it is the same rotation with sin negated):

    dx1 = dy1 * cos1 + dy2 * sin2
    dx2 = dy2 * cos2 - dy1 * sin1

One launch rotates q and k: one program per (batch, seq) position, all q heads
and all k heads of it, in fp32; outputs in the dtype the reference's type promotion
gives (q's dtype when cos/sin have it, as transformers casts them; fp32 for bf16 q
under autocast with fp32 cos/sin), gradients in q's and k's dtypes. Strides are passed,
so the non-contiguous q/k that transformers makes (view + transpose) are read in
place. cos/sin get no gradient: if either requires grad, the reference runs.
"""

from __future__ import annotations

import torch

from .backend import launch, triton_available, use_triton

try:  # the backend reports a missing triton; the reference stands in then
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency of torch on Linux
    triton = None

__all__ = ["apply_rope", "apply_rope_reference", "rotate_half", "RoPEFunction"]


# --------------------------------------------------------------------------- reference


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (transformers' rotate_half)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """transformers' apply_rotary_pos_emb, formula for formula."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


# --------------------------------------------------------------------------- Triton

if triton is not None:

    @triton.jit
    def _rope_rotate(
        x_ptr, y_ptr,
        x_sb, x_sh, x_ss, x_sd,
        y_sb, y_sh, y_ss, y_sd,
        b, s, n_heads, c1, s1, c2, s2,
        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr,
    ):
        h = tl.arange(0, BLOCK_H)[:, None].to(tl.int64)
        d = tl.arange(0, BLOCK_D)[None, :].to(tl.int64)
        mask = (h < n_heads) & (d < HALF)
        x_base = x_ptr + b * x_sb + s * x_ss + h * x_sh
        y_base = y_ptr + b * y_sb + s * y_ss + h * y_sh
        x1 = tl.load(x_base + d * x_sd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + (d + HALF) * x_sd, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(y_base + d * y_sd, y1.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_base + (d + HALF) * y_sd, y2.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
        q_sb, q_sh, q_ss, q_sd,
        k_sb, k_sh, k_ss, k_sd,
        qo_sb, qo_sh, qo_ss, qo_sd,
        ko_sb, ko_sh, ko_ss, ko_sd,
        c_sb, c_ss, c_sd,
        s_sb, s_ss, s_sd,
        seq_len, n_qh, n_kh,
        HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
        BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)  # int64: long sequences overflow int32 offsets
        b = pid // seq_len
        s = pid % seq_len
        d = tl.arange(0, BLOCK_D)[None, :]
        dmask = d < HALF
        cos_row = cos_ptr + b * c_sb + s * c_ss
        sin_row = sin_ptr + b * s_sb + s * s_ss
        c1 = tl.load(cos_row + d * c_sd, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_row + (d + HALF) * c_sd, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_row + d * s_sd, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_row + (d + HALF) * s_sd, mask=dmask, other=0.0).to(tl.float32)
        _rope_rotate(q_ptr, qo_ptr,
                     q_sb, q_sh, q_ss, q_sd, qo_sb, qo_sh, qo_ss, qo_sd,
                     b, s, n_qh, c1, s1, c2, s2, HALF, BLOCK_QH, BLOCK_D, BACKWARD)
        _rope_rotate(k_ptr, ko_ptr,
                     k_sb, k_sh, k_ss, k_sd, ko_sb, ko_sh, ko_ss, ko_sd,
                     b, s, n_kh, c1, s1, c2, s2, HALF, BLOCK_KH, BLOCK_D, BACKWARD)


def _head_axis(unsqueeze_dim: int) -> int | None:
    """The axis of 4-D q/k that cos.unsqueeze(unsqueeze_dim) broadcasts over (0..2), or None."""
    u = unsqueeze_dim + 4 if unsqueeze_dim < 0 else unsqueeze_dim
    return u if 0 <= u <= 2 else None


def _rope_launch_args(q, k, cos, sin, head_axis: int, backward: bool, q_dtype, k_dtype):
    """(q_out, k_out, grid, args, kwargs) of _rope_kernel: the launcher's choices, which kernels/aot.py also
    compiles for the GPU targets (meta tensors work). Arguments as _rope_launch's."""
    # Views with the heads on axis 1: [B, H, S, D]; nothing is copied.
    qv, kv = q.movedim(head_axis, 1), k.movedim(head_axis, 1)
    B, n_qh, S, D = qv.shape
    n_kh = kv.shape[1]
    cos_e, sin_e = cos.expand(B, S, D), sin.expand(B, S, D)  # broadcast dims get stride 0
    # empty_like keeps q's memory layout when it is dense (e.g. the [b, s, h, d] of a transpose).
    q_out, k_out = torch.empty_like(q, dtype=q_dtype), torch.empty_like(k, dtype=k_dtype)
    qov, kov = q_out.movedim(head_axis, 1), k_out.movedim(head_axis, 1)
    half = D // 2
    args = (qv, kv, qov, kov, cos_e, sin_e,
            *qv.stride(), *kv.stride(), *qov.stride(), *kov.stride(),
            *cos_e.stride(), *sin_e.stride(),
            S, n_qh, n_kh)
    kwargs = dict(HALF=half, BLOCK_QH=triton.next_power_of_2(n_qh), BLOCK_KH=triton.next_power_of_2(n_kh),
                  BLOCK_D=triton.next_power_of_2(half), BACKWARD=backward)
    return q_out, k_out, (B * S,), args, kwargs


def _rope_launch(q, k, cos, sin, head_axis: int, backward: bool, q_dtype, k_dtype):
    """Rotate q and k (or their gradients) in one launch; outputs have q/k's shapes.

    q, k are 4-D with the heads on `head_axis`; cos, sin are [B or 1, S or 1, D].
    The outputs are q_dtype and k_dtype; the arithmetic is fp32.
    """
    q_out, k_out, grid, args, kwargs = _rope_launch_args(q, k, cos, sin, head_axis, backward, q_dtype, k_dtype)
    launch(_rope_kernel, grid, *args, **kwargs)
    return q_out, k_out


class RoPEFunction(torch.autograd.Function):
    """RoPE on q and k through the Triton kernel; backward rotates dq, dk by the transpose."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim: int = 1):
        head_axis = _head_axis(unsqueeze_dim)
        ctx.head_axis = head_axis
        ctx.dtypes = (q.dtype, k.dtype)
        ctx.save_for_backward(cos, sin)
        # The reference's type promotion: bf16 q (autocast) times fp32 cos gives fp32.
        return _rope_launch(q, k, cos, sin, head_axis, False, _out_dtype(q, cos, sin), _out_dtype(k, cos, sin))

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_launch(dq, dk, cos, sin, ctx.head_axis, True, *ctx.dtypes)
        return dq, dk, None, None, None


def _out_dtype(x, cos, sin) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETER_DTYPES = (torch.float32, torch.float16)


def _triton_fits(q, k, cos, sin, unsqueeze_dim: int) -> bool:
    """Can the kernel compute exactly what the reference would for these inputs?"""
    if triton is None or not triton_available():
        return False
    if cos.requires_grad or sin.requires_grad:
        return False  # cos/sin get no gradient from the kernel
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        return False
    if q.numel() == 0 or k.numel() == 0:
        return False
    head_axis = _head_axis(unsqueeze_dim)
    if head_axis is None:
        return False
    if len({t.device for t in (q, k, cos, sin)}) != 1:
        return False
    ok = _TRITON_DTYPES if q.is_cuda else _INTERPRETER_DTYPES
    if any(t.dtype not in ok for t in (q, k, cos, sin)):
        return False
    # The output must have q's (and k's) exact shape: cos/sin only broadcast up to it.
    qv, kv = q.movedim(head_axis, 1), k.movedim(head_axis, 1)
    B, _, S, D = qv.shape
    if D % 2 or D == 0 or kv.shape[0] != B or kv.shape[2] != S or kv.shape[3] != D:
        return False
    for c in (cos, sin):
        if c.shape[2] != D or c.shape[0] not in (1, B) or c.shape[1] not in (1, S):
            return False
    return True


def apply_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim: int = 1):
    """Drop-in for transformers' apply_rotary_pos_emb; position_ids is ignored, as there."""
    if use_triton(q) and _triton_fits(q, k, cos, sin, unsqueeze_dim):
        return RoPEFunction.apply(q, k, cos, sin, unsqueeze_dim)
    return apply_rope_reference(q, k, cos, sin, unsqueeze_dim)
