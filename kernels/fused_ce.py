"""Fused linear + cross-entropy: the LM-head loss without the [tokens x vocab] logits.

    loss = fused_linear_cross_entropy(hidden, lm_head.weight, labels, bias=lm_head.bias,
                                      num_items_in_batch=None, chunk_size=None)

Semantics: exactly `F.cross_entropy((hidden @ weight.T + bias).float(), labels,
ignore_index=ignore_index, reduction=reduction)`, hidden [N, H] already shifted
by the caller (labels[i] is the target of hidden[i]; any leading dims are
flattened), weight [V, H], labels [N].

* reduction="mean": the sum of the per-token losses divided by the number of
  labels != ignore_index, or, when `num_items_in_batch` is given, divided by it
  (transformers' `fixed_cross_entropy`). reduction="sum": the plain sum
  (`num_items_in_batch` is then an error). reduction="none" is not supported:
  the gradients are contracted during the forward, see below.
* Nothing to average: every label ignored, "mean" without `num_items_in_batch`
  gives nan, like torch (0/0; the gradients are zero, like torch's). With
  `num_items_in_batch` it gives 0 with zero gradients, like transformers.
* The loss is returned in `accum_dtype` (fp32 by default), like the `.float()`
  logits transformers feeds to its loss.

How (Liger Kernel's trick): the tokens go through in chunks of `chunk_size`.
For each chunk the logits [chunk, V] are computed in `accum_dtype` (fp32), a
kernel computes each row's loss (an online softmax over the vocabulary, block by
block) and overwrites the logits IN PLACE with d(loss)/d(logits) = (softmax -
onehot) / denominator (zero rows for ignored labels); then, still in the
forward, grad_hidden[chunk] = dlogits @ W, grad_W += dlogits.T @ hidden[chunk]
and grad_b += dlogits.sum(0). Only one chunk's logits exist at any time; the
autograd backward just scales the saved gradients by grad_output (a scalar,
skipped when it is 1). Chunks whose labels are all ignored are skipped outright
(no GEMM), which pays off for SFT data with long masked prompts.

Default chunk size (`default_chunk_size`): Liger's rule, the power of two
nearest above N / ceil(V / H), so that a chunk's logits hold about as many
elements as `hidden` itself, clamped to [256, 4096] tokens (and to N): never
tiny GEMMs, and at most 4096 x V fp32 logits however long the sequence (2.1 GB
for a 128K vocabulary). Pass `chunk_size` to bound memory differently.

Precision: with fp16/bf16 inputs the logits are produced in fp32 (on CUDA by
`torch.mm(..., out_dtype=float32)` where the torch build has it; otherwise the
GEMM accumulates in fp32 and its output is rounded to the input dtype before
the upcast, exactly what transformers' `logits.float()` sees). The softmax and
loss are fp32; dlogits is cast to the input dtype for the two gradient GEMMs
(fp32 accumulation inside); grad_W and grad_b accumulate across chunks in
`accum_dtype` and are cast back to the parameters' dtype at the end of the
forward; grad_hidden is written in hidden's dtype.

Backward runs once: the saved gradients are scaled in place and released, so a
second backward through the same graph (retain_graph=True) raises.

`overwrite_hidden=True`: grad_hidden is written over `hidden` itself, chunk by
chunk once the chunk's weight gradient has read it, so the step holds one
[N, H] buffer instead of two (a caller whose hidden states are not used after
the loss: the patched causal LM forward, models/patch.py). `hidden` then holds
the gradient; the loss and every gradient are unchanged, bit for bit.

The Triton kernel runs when `backend.use_triton(hidden)` (a GPU, or the CPU
interpreter with TRITON_INTERPRET=1); otherwise the same chunk loop runs the CE
part in plain torch (`fused_linear_cross_entropy_reference`), so memory stays
bounded there too. `linear_cross_entropy_naive` builds the full logits: ground
truth for tests and the benchmark only.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .backend import holds_no_data, launch, num_warps, use_triton
from .chunking import MAX_CHUNK_TOKENS, MIN_CHUNK_TOKENS, default_chunk_size  # noqa: F401 -- re-exported; torch-free for the planner

try:  # the reference must work without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

# Widest vocabulary block one program holds in registers per loop step; the
# kernel loops over the vocabulary in blocks of at most this many columns.
MAX_BLOCK_V = 16384


# ----------------------------------------------------------------------------------------------
# Ground truth (tests and bench only: builds the full logits)
# ----------------------------------------------------------------------------------------------


def linear_cross_entropy_naive(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
) -> torch.Tensor:
    """F.cross_entropy on the full fp32 logits, with transformers' num_items_in_batch rule."""
    logits = F.linear(hidden, weight, bias).float()
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError("num_items_in_batch divides the summed loss; use reduction='mean'")
        loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


# ----------------------------------------------------------------------------------------------
# Per-chunk CE: loss rows + dlogits written in place over the logits
# ----------------------------------------------------------------------------------------------


def _chunk_ce_torch(logits: torch.Tensor, labels: torch.Tensor, loss_out: torch.Tensor,
                    ignore_index: int, scale: float, compute_grad: bool) -> None:
    """Torch reference of the chunk kernel: loss_out[i] = logsumexp_i - logits[i, y_i] (0 if ignored);
    when compute_grad, logits becomes (softmax - onehot) * scale (zero rows if ignored), in place.
    Works in place throughout (no second [chunk, V] tensor); logits is scratch afterwards either way."""
    valid = labels != ignore_index
    target = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    picked = logits.gather(1, target).squeeze(1)
    row_max = logits.amax(1, keepdim=True)
    exp = logits.sub_(row_max).exp_()  # exp(x - max), in place
    total = exp.sum(1, keepdim=True)
    lse = (row_max + total.log()).squeeze(1)
    loss_out.copy_(torch.where(valid, lse - picked, torch.zeros_like(lse)))
    if not compute_grad:
        return
    exp.div_(total)  # softmax
    exp.scatter_add_(1, target, torch.full_like(target, -1, dtype=exp.dtype))
    exp.mul_((valid.to(exp.dtype) * scale).unsqueeze(1))


if triton is not None:

    @triton.jit
    def _ce_chunk_kernel(
        X, x_stride, Y, LOSS,
        n_cols, ignore_index, scale,
        COMPUTE_GRAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        """One program per row: loss of the row, then (softmax - onehot) * scale over the row, in place."""
        row = tl.program_id(0).to(tl.int64)
        X += row * x_stride
        y = tl.load(Y + row)
        offs = tl.arange(0, BLOCK_SIZE)

        if y == ignore_index:
            tl.store(LOSS + row, 0.0)
            if COMPUTE_GRAD:
                for start in range(0, n_cols, BLOCK_SIZE):
                    cols = start + offs
                    tl.store(X + cols, tl.zeros([BLOCK_SIZE], dtype=tl.float32), mask=cols < n_cols)
            return

        # Pass 1: online max / sum of exp over the vocabulary, block by block.
        m = float("-inf")
        d = 0.0
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + offs
            x = tl.load(X + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        x_y = tl.load(X + y).to(tl.float32)
        tl.store(LOSS + row, lse - x_y)

        # Pass 2: d(loss)/d(logits) over the logits themselves.
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK_SIZE):
                cols = start + offs
                mask = cols < n_cols
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse)
                g = tl.where(cols == y, g - 1.0, g)
                tl.store(X + cols, g * scale, mask=mask)




def _ce_launch(logits: torch.Tensor, labels: torch.Tensor, loss_out: torch.Tensor,
               ignore_index: int, scale: float, compute_grad: bool):
    """(grid, args, kwargs) of _ce_chunk_kernel over one chunk: the launcher's choices, which kernels/aot.py
    also compiles for the GPU targets (meta tensors work)."""
    n_rows, n_cols = logits.shape
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK_V)
    args = (logits, logits.stride(0), labels, loss_out, n_cols, ignore_index, scale)
    return (n_rows,), args, dict(COMPUTE_GRAD=compute_grad, BLOCK_SIZE=block, num_warps=num_warps(block))


def _chunk_ce_triton(logits: torch.Tensor, labels: torch.Tensor, loss_out: torch.Tensor,
                     ignore_index: int, scale: float, compute_grad: bool) -> None:
    """The Triton kernel over one chunk; same contract as _chunk_ce_torch."""
    grid, args, kwargs = _ce_launch(logits, labels, loss_out, ignore_index, scale, compute_grad)
    launch(_ce_chunk_kernel, grid, *args, **kwargs)


# ----------------------------------------------------------------------------------------------
# The chunk loop (shared by both backends)
# ----------------------------------------------------------------------------------------------

_MM_OUT_DTYPE_OK: dict = {}  # device type -> whether torch.mm(..., out_dtype=) works there


def _mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b as `dtype`: same-dtype GEMM, or fp16/bf16 inputs with an fp32 result."""
    if a.dtype == dtype:
        return a @ b
    key = a.device.type
    if _MM_OUT_DTYPE_OK.get(key, key == "cuda"):
        try:
            return torch.mm(a, b, out_dtype=dtype)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[key] = False
    return (a @ b).to(dtype)  # fp32 accumulation inside the GEMM, output rounded to the input dtype


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if h.dtype == dtype and bias is not None:
        return torch.addmm(bias, h, weight.t())
    out = _mm_to(h, weight.t(), dtype)
    if bias is not None:
        out.add_(bias)
    return out


def _forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    num_items_in_batch,
    chunk_size: int,
    accum_dtype: torch.dtype,
    chunk_ce: Callable,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    overwrite_hidden: bool = False,
):
    """The loss and, as asked, grad_hidden, grad_weight, grad_bias for grad_output = 1 (grad_hidden in hidden's own
    storage with overwrite_hidden)."""
    n, h_size = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    n_chunks = -(-n // chunk_size)

    # One host sync: valid labels per chunk (to skip empty chunks), and out-of-range targets.
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= v))
    per_chunk = F.pad(valid.int(), (0, n_chunks * chunk_size - n)).view(n_chunks, chunk_size).sum(1)
    if holds_no_data(labels):  # a dry run's labels hold no data: every label counts
        counts, n_bad = [min(chunk_size, n - i * chunk_size) for i in range(n_chunks)], 0
    else:
        stats = torch.cat([per_chunk, bad.sum().view(1)]).tolist()
        counts, n_bad = stats[:-1], stats[-1]
    if n_bad:
        first = labels[bad][0].item()
        raise IndexError(f"fused_linear_cross_entropy: target {first} is out of bounds for vocabulary size {v}")
    n_valid = sum(counts)

    if reduction == "sum":
        denom = 1.0
    elif num_items_in_batch is not None:
        denom = float(num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    else:
        denom = float(n_valid)  # 0 -> nan loss, like torch
    scale = 1.0 / denom if denom != 0 else math.inf

    compute_grad = need_hidden or need_weight or need_bias
    loss_rows = torch.zeros(n, dtype=accum_dtype, device=device)
    grad_hidden = (hidden if overwrite_hidden else torch.empty_like(hidden)) if need_hidden else None
    grad_weight = torch.zeros(v, h_size, dtype=accum_dtype, device=device) if need_weight else None
    grad_bias = torch.zeros(v, dtype=accum_dtype, device=device) if need_bias else None

    for i in range(n_chunks):
        start, end = i * chunk_size, min((i + 1) * chunk_size, n)
        if counts[i] == 0:  # every label ignored: zero loss, zero grads, no GEMM
            if grad_hidden is not None:
                grad_hidden[start:end].zero_()
            continue
        h = hidden[start:end]
        logits = _chunk_logits(h, weight, bias, accum_dtype)  # [chunk, V], the only logits buffer
        chunk_ce(logits, labels[start:end], loss_rows[start:end], ignore_index, scale, compute_grad)
        if compute_grad:  # logits now holds dlogits
            dlogits = logits if logits.dtype == hidden.dtype else logits.to(hidden.dtype)
            if grad_weight is not None:  # (before grad_hidden: that may be written over h)
                if dlogits.dtype == accum_dtype:
                    grad_weight.addmm_(dlogits.t(), h)
                else:
                    grad_weight.add_(torch.mm(dlogits.t(), h))
            if grad_hidden is not None:
                torch.mm(dlogits, weight, out=grad_hidden[start:end])
            if grad_bias is not None:
                grad_bias.add_(logits.sum(0))
            del dlogits
        del logits

    total = loss_rows.sum()
    loss = total if reduction == "sum" else total / denom
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return loss, grad_hidden, grad_weight, grad_bias


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """forward(hidden [N,H], weight [V,H], bias [V] or None, labels [N], ignore_index, reduction,
    num_items_in_batch, chunk_size, accum_dtype, use_kernel, needs (hidden, weight, bias), overwrite_hidden)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, num_items_in_batch,
                chunk_size, accum_dtype, use_kernel, needs, overwrite_hidden=False):
        chunk_ce = _chunk_ce_triton if use_kernel else _chunk_ce_torch
        loss, gh, gw, gb = _forward(hidden, weight, bias, labels, ignore_index, reduction, num_items_in_batch,
                                    chunk_size, accum_dtype, chunk_ce, *needs, overwrite_hidden=overwrite_hidden)
        ctx.grads = (gh, gw, gb)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy: backward can run once per forward "
                               "(its gradients are computed in the forward and scaled in place)")
        grads, ctx.grads = ctx.grads, None
        if holds_no_data(grad_output) or grad_output.ne(1.0).item():  # (a dry run's holds no data)
            for g in grads:
                if g is not None:
                    g.mul_(grad_output)
        gh, gw, gb = grads
        return gh, gw, gb, None, None, None, None, None, None, None, None, None


def _check(hidden, weight, labels, bias, reduction, num_items_in_batch, chunk_size, accum_dtype):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r} "
                         "(per-token losses cannot be had: gradients are contracted in the forward)")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError("num_items_in_batch divides the summed loss; use reduction='mean'")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., {hidden.shape[-1]}] does not match weight {tuple(weight.shape)} ([V, H])")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"hidden, weight and bias must share a dtype (got {hidden.dtype}, {weight.dtype}"
                         f"{', ' + str(bias.dtype) if bias is not None else ''})")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} does not match the vocabulary size {weight.shape[0]}")
    if labels.numel() * hidden.shape[-1] != hidden.numel():
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not accum_dtype.is_floating_point or torch.finfo(accum_dtype).bits < 32:
        raise ValueError(f"accum_dtype must be float32 or float64, not {accum_dtype}")


def _apply(hidden, weight, labels, bias, ignore_index, reduction, num_items_in_batch, chunk_size,
           accum_dtype, use_kernel: bool, overwrite_hidden: bool = False) -> torch.Tensor:
    _check(hidden, weight, labels, bias, reduction, num_items_in_batch, chunk_size, accum_dtype)
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    if not hidden2.is_contiguous():
        hidden2 = hidden2.contiguous()
    labels = labels.reshape(-1).to(device=hidden.device, dtype=torch.long).contiguous()
    n, h_size = hidden2.shape
    chunk = chunk_size or default_chunk_size(n, h_size, weight.shape[0])
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    return FusedLinearCrossEntropyFunction.apply(
        hidden2, weight, bias, labels, ignore_index, reduction, num_items_in_batch, chunk, accum_dtype,
        use_kernel, needs, overwrite_hidden,
    )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    chunk_size: Optional[int] = None,
    accum_dtype: torch.dtype = torch.float32,
    overwrite_hidden: bool = False,
) -> torch.Tensor:
    """CE of (hidden @ weight.T + bias) against labels, chunk by chunk; Triton where it can run. overwrite_hidden:
    the hidden states' gradient is written over them (see the module doc)."""
    return _apply(hidden, weight, labels, bias, ignore_index, reduction, num_items_in_batch, chunk_size,
                  accum_dtype, use_kernel=use_triton(hidden), overwrite_hidden=overwrite_hidden)


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    chunk_size: Optional[int] = None,
    accum_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The same chunk loop with the CE part in plain torch (no Triton); memory stays bounded."""
    return _apply(hidden, weight, labels, bias, ignore_index, reduction, num_items_in_batch, chunk_size,
                  accum_dtype, use_kernel=False)
