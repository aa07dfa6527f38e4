"""Exact causal attention with the forward and backward kernels called separately.

Why: the activation runtime keeps the attention output and its logsumexp from the forward
and, in the backward, hands them straight to the backward kernel. Going through autograd
(``F.scaled_dot_product_attention`` under checkpointing) would run the attention forward a
second time just to rebuild the graph; calling ATen's flash kernels directly does not: the
backward of softmax attention needs only q, k, v, the output O, the row logsumexp L and dO
(P = exp(q k^T * scale - L), D = rowsum(dO * O), dS = P * (dO v^T - D)).

The same identity makes the backward *blockwise exact*: for any block of queries and any block
of keys, the kernel given the GLOBAL O and L (not ones recomputed from that block alone) returns
that block's exact share of dq, dk, dv; the shares add up. Two uses follow:

* Packed documents: tokens attend causally within their document only. A document starts wherever
  the positions do not step by +1 (and at token 0), as in transformers. Each (batch row, document) is its own causal call, so
  no mask tensor is built and no work is spent on masked-out blocks.
* A backward one query chunk at a time (``attention_backward_chunk``): the runtime frees the
  chunk's activations as soon as the chunk is done. Within a document, the chunk's queries
  [a, b) see keys [doc_start, a) (full, non-causal blocks) and [a, b) (a square causal block).
  The split is needed because the kernels' ``is_causal`` is TOP-LEFT aligned when queries are
  fewer than keys (query i sees keys 0..i, not the last ones), so causal is only ever used with
  equal query and key lengths here.
* Key blocks: the earlier keys go in blocks of at most ``key_block`` (the runtime passes its chunk
  length), so no call's buffers grow with the sequence: FlashAttention-2's backward holds dk and dv
  per query head for every key of a call (with grouped heads, 4x K and V for Llama-3), and its
  shares of dk/dv are the call's size. The shares add up, so this is exact as it is. The forward
  needs them only where its kernel repeats K and V per query head (fp32 on CUDA,
  ``forward_key_block``): FlashAttention's forward and the CPU kernel hold just the output.
* A forward one query chunk at a time (``attention_forward_chunk``): the chunk's queries against
  the keys so far, so the runtime never holds q or the output of all tokens at once. The blocks'
  outputs are merged with their logsumexps (o = sum_j exp(L_j - L) o_j, L = logsumexp_j L_j, in
  fp32): exact in real arithmetic; in floating point each block's output is rounded to q's dtype
  once before the merge (a document that starts inside the chunk is one call, as in
  ``attention_forward``).

Kernels: on the CPU ``_scaled_dot_product_flash_attention_for_cpu`` and its backward (fp64,
fp32, bf16, fp16; GQA native; bitwise ``F.scaled_dot_product_attention``). On CUDA the flash
kernels for bf16/fp16 and the memory-efficient (cutlass) kernels for fp32; see ``_forward``
and ``_backward``. Dropout is not supported (always 0). The softmax scale is always passed
explicitly (the model's ``head_dim ** -0.5``, or whatever its config says).

Layout: q [b, nq, s, d], k/v [b, nkv, s, d] with nq a multiple of nkv (GQA: query head h reads
k/v head h // (nq // nkv), as ``enable_gqa`` does). Outputs come back as the kernels make them:
``[b, nq, s, d]`` views of contiguous ``[b, s, nq, d]`` buffers, so ``out.transpose(1, 2)`` is
contiguous and reshapes to [b, s, nq * d] for the output projection without a copy.
"""

from __future__ import annotations

import torch

from .live_bytes import holds_no_data

__all__ = ["documents", "attention_forward", "attention_forward_chunk", "attention_backward_chunk",
           "forward_key_block"]

aten = torch.ops.aten

Documents = list[list[tuple[int, int]]]

# GQA on CUDA. The flash kernels (FlashAttention-2's mha_fwd / mha_bwd as vendored in ATen,
# aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp) accept fewer k/v heads than
# q heads and sum dk/dv over each group themselves, so k/v go in unrepeated. The memory-efficient
# kernel used for fp32 does not (its backward TORCH_CHECKs equal head counts): there k/v heads
# are repeated with repeat_interleave on dim 1 before the call and dk/dv summed back over each
# group after it. Set this to False to repeat for flash as well (the GPU tests run both ways).
_FLASH_NATIVE_GQA = True

# The memory-efficient kernel's logsumexp is padded along the sequence to a multiple of this.
_EFFICIENT_LSE_ALIGN = 32


def documents(position_ids: torch.Tensor | None, seq_len: int, batch: int) -> Documents:
    """Per batch row, the ``[start, end)`` of each document, in order, covering ``[0, seq_len)``.

    A document starts at token 0 and wherever the positions do not step by +1 (transformers' rule for packed
    sequences, masking_utils.find_packed_sequence_indices: a restart at 0, or any jump). ``position_ids`` may be
    [batch, seq_len], [1, seq_len] or [seq_len] (the last two shared by every row); ``None``
    means one document per row, and so do positions that hold no data (a dry run's: the boundaries cannot
    be read). Runs on a CPU copy with a single ``.tolist()`` (one device sync).
    """
    if seq_len < 1 or batch < 1:
        raise ValueError(f"seq_len and batch must be positive, got seq_len={seq_len}, batch={batch}")
    if position_ids is None or holds_no_data(position_ids):
        return [[(0, seq_len)] for _ in range(batch)]
    pos = position_ids.detach()
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    if pos.dim() != 2 or pos.shape[1] != seq_len or pos.shape[0] not in (1, batch):
        raise ValueError(
            f"position_ids of shape {tuple(position_ids.shape)} do not match "
            f"batch={batch}, seq_len={seq_len}"
        )
    starts: list[list[int]] = [[0] for _ in range(pos.shape[0])]
    # Nonzero positions come back row-major, so each row's starts arrive in increasing order.
    for row, col in torch.nonzero((pos[:, 1:] - pos[:, :-1]).cpu() != 1).tolist():
        starts[row].append(col + 1)
    rows = [list(zip(st, st[1:] + [seq_len])) for st in starts]
    if len(rows) == 1 and batch > 1:
        rows = [list(rows[0]) for _ in range(batch)]
    return rows


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within each document; returns ``(out, lse)`` for the backward.

    q [b, nq, s, d], k/v [b, nkv, s, d] (views are fine). ``out`` is [b, nq, s, d] in q's dtype,
    a transposed view of a contiguous [b, s, nq, d] buffer. ``lse`` is [b, nq, s], contiguous,
    float32 (float64 for float64 inputs): the natural-log logsumexp of each query's scaled scores.

    When every row is one document this is a single kernel call whose output is returned as is.
    Otherwise each document is one call (over all rows at once when every row has the same
    boundaries, else one per row and document), written into preallocated ``out``/``lse``.
    """
    b, nq, s, d = _check_qkv(q, k, v)
    _check_docs(docs, b, s)
    shared = all(row == docs[0] for row in docs)
    if shared and docs[0] == [(0, s)]:
        out, lse = _forward(q, k, v, True, scale)
        return out, lse.contiguous()

    out = torch.empty(b, s, nq, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(b, nq, s, dtype=_lse_dtype(q), device=q.device)
    for rows, row_docs in _row_groups(docs, b, shared):
        for ds, de in row_docs:
            o, l = _forward(q[rows, :, ds:de], k[rows, :, ds:de], v[rows, :, ds:de], True, scale)
            out[rows, :, ds:de].copy_(o)
            lse[rows, :, ds:de].copy_(l)
    return out, lse


def _key_blocks(first: int, end: int, key_block: int | None) -> list[tuple[int, int]]:
    """[first, end) in consecutive blocks of at most key_block keys (one block when None)."""
    step = (end - first) if not key_block else key_block
    return [(ks, min(ks + step, end)) for ks in range(first, end, max(1, step))]


def forward_key_block(q: torch.Tensor, chunk: int) -> int | None:
    """The key block a chunk's forward needs: `chunk` where a call's buffers grow with its keys (the fp32 CUDA
    kernel, which repeats K and V per query head), else None (one call for all the earlier keys: FlashAttention's
    forward and the CPU kernel hold only the output and lse, and fewer calls mean fewer merges)."""
    return None if q.device.type == "cpu" or _is_flash(q) else chunk


def attention_forward_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents, start: int, end: int, scale: float,
    key_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the query rows ``[start, end)`` within their documents: ``(out, lse)`` of those rows.

    ``q`` is the chunk's [b, nq, end - start, d]; ``k``, ``v`` hold at least the keys ``[0, end)``
    ([b, nkv, s, d], s >= end; later keys are not read, so a buffer still being filled is fine). ``out`` is
    [b, nq, end - start, d] in q's dtype, a transposed view of a contiguous [b, end - start, nq, d] buffer;
    ``lse`` [b, nq, end - start], contiguous, float32 (float64 for float64). Concatenated over the chunks
    they are ``attention_forward``'s, to the rounding of q's dtype (the module doc)."""
    b, nq, n, d = _check_qkv(q, k, v, key_len=k.shape[2])
    s = k.shape[2]
    if not 0 <= start < end <= s or n != end - start:
        raise ValueError(f"chunk [{start}, {end}) does not fit {n} query rows in a sequence of {s}")
    out = torch.empty(b, n, nq, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(b, nq, n, dtype=_lse_dtype(q), device=q.device)
    for rows, row_docs in _row_groups(docs, b, all(row == docs[0] for row in docs)):
        for ds, de in row_docs:
            if de <= start:
                continue
            if ds >= end:
                break
            a, e = max(ds, start), min(de, end)  # the queries of this document in the chunk
            qa, qe = a - start, e - start
            qb = q[rows, :, qa:qe]
            o, l = _forward(qb, k[rows, :, a:e], v[rows, :, a:e], True, scale)  # the square causal block
            if ds < a:  # earlier keys of the document: all visible, merged by their logsumexps
                acc, total = o.to(lse.dtype), l.to(lse.dtype)
                del o, l
                for ks, ke in _key_blocks(ds, a, key_block):
                    ob, lb = _forward(qb, k[rows, :, ks:ke], v[rows, :, ks:ke], False, scale)
                    merged = torch.logaddexp(total, lb)
                    acc.mul_(torch.exp(total - merged).unsqueeze(-1))
                    acc.addcmul_(ob, torch.exp(lb - merged).unsqueeze(-1))
                    total = merged
                    del ob, lb
                o, l = acc, total
            out[rows, :, qa:qe].copy_(o)
            lse[rows, :, qa:qe].copy_(l)
            del o, l
    return out, lse


def attention_backward_chunk(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    docs: Documents,
    start: int,
    end: int,
    scale: float,
    dk: torch.Tensor,
    dv: torch.Tensor,
    key_block: int | None = None,
) -> torch.Tensor:
    """Backward of the query rows ``[start, end)`` (all batch rows); returns their dq. The earlier keys of a
    document go in blocks of at most ``key_block`` (None: one block), which bounds every call's buffers.

    ``dout``, ``q``, ``out`` are the chunk's rows, [b, nq, end - start, d]; ``lse`` the chunk's
    [b, nq, end - start] from ``attention_forward`` (global values, not recomputed); ``k``, ``v``
    the FULL keys [b, nkv, s, d]. The chunk's contributions to dk and dv are added in place into
    the caller's accumulators ``dk``, ``dv`` (full [b, nkv, s, d], any dtype: the kernels compute
    in the input dtype and the sums are done in the accumulator's dtype, so fp32 accumulators
    for bf16 inputs add in fp32). Returns dq [b, nq, end - start, d] in q's dtype, a transposed
    view of a contiguous [b, end - start, nq, d] buffer (its partial sums are kept in fp32 or
    wider).

    Completeness: a key at position j gets gradient only from queries at positions >= j (causal,
    whatever the documents). So when the chunks are processed in REVERSE order (last chunk
    first), the rows ``[start, end)`` of dk and dv are final as soon as this chunk has been
    processed: no later call touches them. The runtime relies on this to offload or consume
    them early.
    """
    b, nq, n, d = _check_qkv(q, k, v, key_len=k.shape[2])
    s = k.shape[2]
    if not 0 <= start < end <= s or n != end - start:
        raise ValueError(f"chunk [{start}, {end}) does not fit {n} query rows in a sequence of {s}")
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(
            f"dout {tuple(dout.shape)}, out {tuple(out.shape)} must be q's {tuple(q.shape)} and "
            f"lse {tuple(lse.shape)} must be {tuple(q.shape[:3])}"
        )
    if dk.shape != k.shape or dv.shape != v.shape:
        raise ValueError(f"dk {tuple(dk.shape)} / dv {tuple(dv.shape)} must be k's {tuple(k.shape)}")
    _check_docs(docs, b, s)

    dq = torch.zeros(b, n, nq, d, dtype=_lse_dtype(q), device=q.device).transpose(1, 2)
    for rows, row_docs in _row_groups(docs, b, all(row == docs[0] for row in docs)):
        for ds, de in row_docs:
            if de <= start:
                continue
            if ds >= end:
                break
            a, e = max(ds, start), min(de, end)  # the queries of this document in the chunk
            qa, qe = a - start, e - start
            blk = (dout[rows, :, qa:qe], q[rows, :, qa:qe], out[rows, :, qa:qe], lse[rows, :, qa:qe])
            # Earlier keys of the document: all visible, no mask. Skipped when empty: the CPU
            # kernel dies with SIGFPE on zero keys.
            for ks, ke in _key_blocks(ds, a, key_block):  # none when ds == a
                gq, gk, gv = _backward(*blk, k[rows, :, ks:ke], v[rows, :, ks:ke], False, scale)
                dq[rows, :, qa:qe].add_(gq)
                dk[rows, :, ks:ke].add_(gk)
                dv[rows, :, ks:ke].add_(gv)
                del gq, gk, gv  # before the next block's
            # The diagonal block: square, so top-left causal is the right mask.
            gq, gk, gv = _backward(*blk, k[rows, :, a:e], v[rows, :, a:e], True, scale)
            dq[rows, :, qa:qe].add_(gq)
            dk[rows, :, a:e].add_(gk)
            dv[rows, :, a:e].add_(gv)
    return dq.to(q.dtype)


# --------------------------------------------------------------------------------------------
# Kernel calls. Everything that is not the CPU takes the CUDA branch; the meta device does too,
# which lets the tests check this branch's call signatures and shapes without a GPU.


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One kernel call: ``(out, lse)`` with lse [b, nq, sq] (not necessarily contiguous)."""
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    q, k, v = _last_dim_contiguous(q, k, v)
    if _is_flash(q):
        if not _FLASH_NATIVE_GQA:
            k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
        out, lse, *_ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale
        )
        return out, lse
    _check_efficient(q)
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale
    )
    return out, lse[:, :, : q.shape[2]]  # drop the padding to a multiple of 32


def _inside_the_kernel(q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
    """A dry run's stand-in (meta tensors) for what the flash backward allocates inside the kernel, which its
    meta implementation does not: held around the call, so the dry run's count sees it."""
    from longtune.planner.inventory import flash_backward_inside  # a fact of the kernel, not of a plan (its docstring)

    (b, nq, sq, d), nkv, sk = q.shape, k.shape[1], k.shape[2]
    sizes = flash_backward_inside(nq, nkv, d, q.element_size(), b * sk, b * sq)
    return [torch.empty(int(n), dtype=torch.uint8, device=q.device) for n in sizes.values()]


def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One kernel call: this block's ``(dq, dk, dv)`` given the global ``out`` and ``lse``."""
    # The kernels index lse as a dense [b, h, sq] array; a slice along the sequence is not one.
    lse = lse.contiguous()
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )
    dout, q, out, k, v = _last_dim_contiguous(dout, q, out, k, v)
    nq, nkv = q.shape[1], k.shape[1]
    # No dropout, so the kernels never read the RNG state: the seed and offset tensors below
    # only fill the arguments (shaped and typed as each forward returns them).
    if _is_flash(q):
        seed = torch.empty(2, dtype=torch.uint64, device=q.device)
        offset = torch.empty((), dtype=torch.uint64, device=q.device)
        repeat = not _FLASH_NATIVE_GQA and nq != nkv
        if repeat:
            k, v = _repeat_kv(k, nq), _repeat_kv(v, nq)
        # cum_seq_q/k None (undefined) selects the dense, non-varlen kernel; max_q/max_k are
        # only read by the varlen one.
        inside = _inside_the_kernel(q, k) if holds_no_data(q) else None
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal,
            seed, offset, scale=scale,
        )
        del inside
        if repeat:
            dk, dv = _sum_groups(dk, nkv), _sum_groups(dv, nkv)
        return dq, dk, dv
    _check_efficient(q)
    k, v = _repeat_kv(k, nq), _repeat_kv(v, nq)
    # The forward's lse is padded to a multiple of 32 with +inf and the kernel reads it in
    # blocks of that size: give it the same shape back.
    pad = -lse.shape[2] % _EFFICIENT_LSE_ALIGN
    if pad:
        lse = torch.nn.functional.pad(lse, (0, pad), value=float("inf"))
    # The kernel reads out's rows at a stride of nq * d (the [b, s, nq, d] layout the forward
    # returns, of which a slice along the sequence is fine) whatever strides out has.
    ot = out.transpose(1, 2)
    if ot.stride(1) != nq * ot.shape[3] or ot.stride(2) != ot.shape[3]:
        out = ot.contiguous().transpose(1, 2)
    seed = offset = torch.empty((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False], causal,
        scale=scale,
    )
    del k, v  # the repeated copies, before the group sums
    dk = _sum_groups(dk, nkv)
    dv = _sum_groups(dv, nkv)
    return dq, dk, dv


def _is_flash(q: torch.Tensor) -> bool:
    return q.dtype in (torch.float16, torch.bfloat16)


def _check_efficient(q: torch.Tensor) -> None:
    if q.dtype != torch.float32:
        raise TypeError(f"attention on {q.device.type} supports bf16, fp16 and fp32, not {q.dtype}")


def _repeat_kv(x: torch.Tensor, nq: int) -> torch.Tensor:
    """[b, nkv, s, d] -> [b, nq, s, d]: k/v head j serves query heads j*g .. j*g + g - 1."""
    nkv = x.shape[1]
    return x if nkv == nq else x.repeat_interleave(nq // nkv, dim=1)


def _sum_groups(x: torch.Tensor, nkv: int) -> torch.Tensor:
    """The inverse of ``_repeat_kv`` for gradients: [b, nq, s, d] -> [b, nkv, s, d]."""
    return x if x.shape[1] == nkv else x.unflatten(1, (nkv, x.shape[1] // nkv)).sum(2)


def _last_dim_contiguous(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x if x.stride(-1) == 1 else x.contiguous() for x in xs]


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _row_groups(docs: Documents, batch: int, shared: bool) -> list[tuple[slice, list[tuple[int, int]]]]:
    """Rows that are processed together: all of them when they share boundaries, else one each."""
    if shared:
        return [(slice(0, batch), docs[0])]
    return [(slice(r, r + 1), docs[r]) for r in range(batch)]


def _check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_len: int | None = None
) -> tuple[int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q, k, v must be 4-d with k and v alike: {q.shape}, {k.shape}, {v.shape}")
    b, nq, s, d = q.shape
    nkv = k.shape[1]
    if k.shape[0] != b or k.shape[3] != d or nkv == 0 or nq % nkv:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match (b, heads, d)")
    if k.shape[2] != (s if key_len is None else key_len):
        raise ValueError(f"q has {s} positions, k {k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("q, k, v must share dtype and device")
    return b, nq, s, d


def _check_docs(docs: Documents, batch: int, seq_len: int) -> None:
    if len(docs) != batch:
        raise ValueError(f"{len(docs)} rows of documents for a batch of {batch}")
    for r, row in enumerate(docs):
        pos = 0
        for ds, de in row:
            if ds != pos or de <= ds:
                raise ValueError(f"row {r}: documents {row} do not tile [0, {seq_len})")
            pos = de
        if pos != seq_len:
            raise ValueError(f"row {r}: documents {row} do not tile [0, {seq_len})")
