"""The split forward/backward attention core (longtune.offload.attention) against F.sdpa.

References are float64 autograd of ``F.scaled_dot_product_attention`` with a block-diagonal
causal bool mask. Gradient errors are measured relative to the gradient's largest magnitude.
The CPU kernels support float64, so the exactness checks run there; fp32 and bf16 check
that the same code holds at the precisions used in training.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from longtune.offload import attention as A
from longtune.offload.attention import attention_backward_chunk, attention_forward, attention_forward_chunk, documents

NQ, NKV, D = 4, 2, 8
SCALE = D**-0.5
S = 48

# Position ids per case (batch 2, S tokens). "rows differ": a one-token document (row 1 at 3),
# a document starting at the last token (row 1 at 47), boundaries that differ between rows.
_ROW0 = [*range(10), *range(25), *range(13)]
_ROW1 = [*range(3), 0, *range(30), *range(13), 0]
CASES = {
    "one document": None,
    "rows share boundaries": torch.tensor([_ROW0]),
    "rows differ": torch.tensor([_ROW0, _ROW1]),
}
# Chunk boundaries: 1, 2, 3 (uneven) and 4 chunks; the last has a one-token chunk [10, 11)
# that starts a document in row 0, and chunks that cut through documents.
CHUNKS = [[0, S], [0, 24, S], [0, 7, 30, S], [0, 10, 11, 35, S]]


def _inputs(dtype: torch.dtype, batch: int = 2, seed: int = 0):
    """q, k, v as the runtime has them: [b, h, s, d] views of [b, s, h, d] projections."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, S, NQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(batch, S, NKV, D, generator=g, dtype=torch.float64)
    v = torch.randn(batch, S, NKV, D, generator=g, dtype=torch.float64)
    dout = torch.randn(batch, S, NQ, D, generator=g, dtype=torch.float64)
    return [x.to(dtype).transpose(1, 2) for x in (q, k, v, dout)]


def _mask(docs, seq_len: int) -> torch.Tensor:
    mask = torch.zeros(len(docs), 1, seq_len, seq_len, dtype=torch.bool)
    for r, row in enumerate(docs):
        for a, e in row:
            mask[r, 0, a:e, a:e] = torch.ones(e - a, e - a, dtype=torch.bool).tril()
    return mask


def _reference(q, k, v, dout, docs):
    """float64 (out, lse, dq, dk, dv) from autograd of masked sdpa."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    mask = _mask(docs, q.shape[2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=SCALE)
    out.backward(dout.double())
    scores = q @ k.repeat_interleave(NQ // NKV, 1).transpose(-1, -2) * SCALE
    lse = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _chunked_backward(dout, q, k, v, out, lse, docs, bounds, acc_dtype):
    """Chunks in reverse order; also returns dk/dv snapshots taken right after each chunk."""
    dk = torch.zeros(k.shape, dtype=acc_dtype)
    dv = torch.zeros(v.shape, dtype=acc_dtype)
    dqs, snapshots = [], []
    for start, end in reversed(list(zip(bounds, bounds[1:]))):
        rows = slice(start, end)
        dq = attention_backward_chunk(
            dout[:, :, rows], q[:, :, rows], k, v, out[:, :, rows], lse[:, :, rows],
            docs, start, end, SCALE, dk, dv,
        )
        assert dq.shape == (q.shape[0], NQ, end - start, D) and dq.dtype == q.dtype
        assert dq.transpose(1, 2).is_contiguous()
        dqs.insert(0, dq)
        snapshots.append((start, end, dk[:, :, rows].clone(), dv[:, :, rows].clone()))
    return torch.cat(dqs, dim=2), dk, dv, snapshots


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference's max magnitude."""
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------------------------- documents


def test_documents_tricky_position_ids():
    assert documents(None, 5, 2) == [[(0, 5)], [(0, 5)]]
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 0], [7, 8, 0, 1, 2, 3, 4, 5]])
    assert documents(pos, 8, 2) == [
        [(0, 3), (3, 4), (4, 7), (7, 8)],  # one-token documents, one at the last token
        [(0, 2), (2, 8)],  # the first document starts mid-sequence (positions 7, 8)
    ]
    assert documents(torch.zeros(1, 3, dtype=torch.long), 3, 1) == [[(0, 1), (1, 2), (2, 3)]]
    # transformers' rule: a document starts wherever positions do not step by +1, not only at 0
    assert documents(torch.tensor([[5, 6, 7, 20, 21, 3, 4, 5]]), 8, 1) == [[(0, 3), (3, 5), (5, 8)]]
    # [1, s] and [s] are shared by every row, each row getting its own list.
    shared = documents(torch.tensor([[0, 1, 0, 1]]), 4, 3)
    assert shared == [[(0, 2), (2, 4)]] * 3 and shared[0] is not shared[1]
    assert documents(torch.tensor([0, 1, 0, 1]), 4, 2) == [[(0, 2), (2, 4)]] * 2
    for bad, s, b in [(torch.zeros(2, 4), 5, 2), (torch.zeros(3, 4), 4, 2), (torch.zeros(2, 2, 4), 4, 2)]:
        with pytest.raises(ValueError):
            documents(bad, s, b)


def test_documents_must_tile_the_sequence():
    q, k, v, _ = _inputs(torch.float32, batch=1)
    for bad in ([[(0, 20)]], [[(0, 20), (21, S)]], [[(0, 0), (0, S)]], [[(0, S)], [(0, S)]]):
        with pytest.raises(ValueError):
            attention_forward(q, k, v, bad, SCALE)


# ------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_forward_one_document_is_sdpa(dtype):
    q, k, v, _ = _inputs(dtype)
    out, lse = attention_forward(q, k, v, documents(None, S, 2), SCALE)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=SCALE)
    assert torch.equal(out, ref)  # the same kernel: bitwise
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    assert lse.shape == (2, NQ, S) and lse.is_contiguous()
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _, ref_lse, *_ = _reference(q, k, v, torch.zeros_like(q), documents(None, S, 2))
    assert _rel(lse, ref_lse) < {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 1e-4}[dtype]


@pytest.mark.parametrize("case", ["rows share boundaries", "rows differ"])
def test_forward_packed_documents(case):
    q, k, v, _ = _inputs(torch.float64)
    docs = documents(CASES[case], S, 2)
    out, lse = attention_forward(q, k, v, docs, SCALE)
    assert out.transpose(1, 2).is_contiguous() and lse.is_contiguous()
    # Per-document sdpa calls, concatenated; made as the core makes them (all rows in one call
    # when they share boundaries), so bitwise equal (batching changes the last bit).
    groups = [(slice(0, 2), docs[0])] if case == "rows share boundaries" else [
        (slice(r, r + 1), row) for r, row in enumerate(docs)
    ]
    sdpa = [
        torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[rows, :, a:e], k[rows, :, a:e], v[rows, :, a:e],
                    is_causal=True, enable_gqa=True, scale=SCALE,
                )
                for a, e in row
            ],
            dim=2,
        )
        for rows, row in groups
    ]
    assert torch.equal(out, torch.cat(sdpa))
    ref_out, ref_lse, *_ = _reference(q, k, v, torch.zeros_like(q), docs)
    assert _rel(out, ref_out) < 1e-14
    assert _rel(lse, ref_lse) < 1e-14


def test_forward_kernel_calls(monkeypatch):
    """One call for one document; shared boundaries batch rows; differing ones go per row."""
    calls = []
    real = A._forward

    def counting(q, *args):
        calls.append(q.shape[0])
        return real(q, *args)

    monkeypatch.setattr(A, "_forward", counting)
    q, k, v, _ = _inputs(torch.float32)
    for case, expected in [("one document", [2]), ("rows share boundaries", [2, 2, 2]),
                           ("rows differ", [1] * 3 + [1] * 5)]:
        calls.clear()
        attention_forward(q, k, v, documents(CASES[case], S, 2), SCALE)
        assert calls == expected, case


# ----------------------------------------------------------------------------------- backward


@functools.lru_cache(maxsize=None)
def _backward_case(dtype: torch.dtype, case: str):
    """Inputs, forward, float64 reference gradients and sdpa's own errors in this dtype; shared
    by the chunkings of one (dtype, case)."""
    q, k, v, dout = _inputs(dtype)
    docs = documents(CASES[case], S, 2)
    out, lse = attention_forward(q, k, v, docs, SCALE)
    _, _, *grads = _reference(q, k, v, dout, docs)
    qb, kb, vb = (x.detach().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=_mask(docs, S), enable_gqa=True, scale=SCALE)
    ref.backward(dout)
    baseline = [_rel(x.grad, g) for x, g in zip((qb, kb, vb), grads)]
    return q, k, v, dout, docs, out, lse, grads, baseline


@pytest.mark.parametrize("bounds", CHUNKS, ids=lambda b: f"{len(b) - 1}chunks")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "dtype,acc_dtype,tol",
    [
        (torch.float64, torch.float64, 1e-14),
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.float32, None),  # fp32 accumulators for bf16 inputs
    ],
    ids=["fp64", "fp32", "bf16-fp32acc"],
)
def test_chunked_backward_matches_autograd(dtype, acc_dtype, tol, case, bounds):
    q, k, v, dout, docs, out, lse, (rdq, rdk, rdv), baseline = _backward_case(dtype, case)
    dq, dk, dv, snapshots = _chunked_backward(dout, q, k, v, out, lse, docs, bounds, acc_dtype)
    assert dk.dtype == dv.dtype == acc_dtype
    errors = [_rel(dq, rdq), _rel(dk, rdk), _rel(dv, rdv)]
    if tol is None:
        # bf16: no worse than bf16 autograd of sdpa itself (plus one bf16 rounding of slack).
        assert all(e <= 2 * b + 2**-8 for e, b in zip(errors, baseline)), (errors, baseline)
    else:
        assert max(errors) < tol, errors

    # dk/dv rows of a chunk are final right after that chunk (reverse order): nothing later
    # touches them.
    for start, end, sk, sv in snapshots:
        assert torch.equal(sk, dk[:, :, start:end]) and torch.equal(sv, dv[:, :, start:end])


@pytest.mark.parametrize("key_block", [None, 5, 16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 1e-6), (torch.bfloat16, 2**-7)],
                         ids=["fp64", "fp32", "bf16"])
def test_forward_by_query_chunk_is_the_whole_forward(dtype, tol, case, key_block):
    """Each chunk's queries against the keys so far, in key blocks merged by their logsumexps: concatenated, the
    whole forward's output and lse (fp64/fp32 to rounding; bf16 within one rounding of the output, as each
    block's output is rounded once before the merge). Chunks cut through documents; a later key is never read."""
    q, k, v, _ = _inputs(dtype)
    docs = documents(CASES[case], S, 2)
    out, lse = attention_forward(q, k, v, docs, SCALE)
    for bounds in CHUNKS:
        outs, lses = [], []
        for a, e in zip(bounds, bounds[1:]):
            garbage = k.clone(), v.clone()
            for x in garbage:
                x[:, :, e:] = float("nan")  # keys not computed yet when the chunk runs
            o, l = attention_forward_chunk(q[:, :, a:e], *garbage, docs, a, e, SCALE, key_block)
            assert o.shape == (2, NQ, e - a, D) and o.dtype == dtype and o.transpose(1, 2).is_contiguous()
            assert l.shape == (2, NQ, e - a) and l.is_contiguous()
            outs.append(o)
            lses.append(l)
        got, got_lse = torch.cat(outs, 2), torch.cat(lses, 2)
        assert _rel(got, out.double()) < tol, (bounds, _rel(got, out.double()))
        assert _rel(got_lse, lse.double()) < max(tol, 1e-6)
        if len(bounds) == 2:  # one chunk: the whole forward, call for call
            assert torch.equal(got, out)


def test_key_blocks_give_the_backward_of_one_block():
    """The backward's earlier keys in blocks (which bounds the kernel's buffers) add up to the one-block result."""
    for case in CASES:
        q, k, v, dout, docs, out, lse, _, _ = _backward_case(torch.float64, case)
        for bounds in CHUNKS[1:]:
            ref = _chunked_backward(dout, q, k, v, out, lse, docs, bounds, torch.float64)
            for key_block in (1, 5, 16):
                dk, dv = torch.zeros_like(k), torch.zeros_like(v)
                dqs = [attention_backward_chunk(dout[:, :, a:e], q[:, :, a:e], k, v, out[:, :, a:e], lse[:, :, a:e],
                                                docs, a, e, SCALE, dk, dv, key_block)
                       for a, e in reversed(list(zip(bounds, bounds[1:])))]
                dq = torch.cat(dqs[::-1], 2)
                for x, r in zip((dq, dk, dv), ref[:3]):
                    assert _rel(x, r) < 1e-14, (case, bounds, key_block)


def test_chunk_rows_incomplete_before_their_chunk():
    """The property above is not vacuous: earlier-processed chunks do not finish later rows."""
    q, k, v, dout = _inputs(torch.float64)
    docs = documents(None, S, 2)
    out, lse = attention_forward(q, k, v, docs, SCALE)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    attention_backward_chunk(dout[:, :, 24:], q[:, :, 24:], k, v, out[:, :, 24:], lse[:, :, 24:],
                             docs, 24, S, SCALE, dk, dv)
    _, _, _, rdk, _ = _reference(q, k, v, dout, docs)
    assert _rel(dk[:, :, 24:], rdk[:, :, 24:]) < 1e-13  # the processed chunk: done
    assert (dk[:, :, :24] - rdk[:, :, :24]).abs().max() > 1e-3  # earlier rows: not yet


def test_backward_rejects_mismatched_chunk():
    q, k, v, dout = _inputs(torch.float32)
    docs = documents(None, S, 2)
    out, lse = attention_forward(q, k, v, docs, SCALE)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    with pytest.raises(ValueError):
        attention_backward_chunk(dout[:, :, :8], q[:, :, :8], k, v, out[:, :, :8], lse[:, :, :8],
                                 docs, 0, 10, SCALE, dk, dv)


# ------------------------------------------------------------- CUDA branch, on the meta device


@pytest.mark.parametrize("native_gqa", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_branch_shapes_on_meta(dtype, native_gqa, monkeypatch):
    """The CUDA kernels' call signatures, lse padding/slicing and GQA plumbing, without a GPU."""
    monkeypatch.setattr(A, "_FLASH_NATIVE_GQA", native_gqa)
    s, d = 40, 64  # 40: the efficient kernel's lse comes back padded to 64
    q = torch.empty(2, s, NQ, d, dtype=dtype, device="meta").transpose(1, 2)
    k = torch.empty(2, s, NKV, d, dtype=dtype, device="meta").transpose(1, 2)
    v = torch.empty_like(k)
    pos = torch.tensor([[*range(15), *range(25)], [*range(3), 0, *range(36)]])
    for docs in (documents(None, s, 2), documents(pos, s, 2)):
        out, lse = attention_forward(q, k, v, docs, 0.125)
        assert out.shape == q.shape and out.dtype == dtype and out.transpose(1, 2).is_contiguous()
        for start, end in [(0, 17), (17, s)]:
            o, l = attention_forward_chunk(q[:, :, start:end], k, v, docs, start, end, 0.125, 8)
            assert o.shape == q[:, :, start:end].shape and l.shape == (2, NQ, end - start) and l.is_contiguous()
        assert lse.shape == (2, NQ, s) and lse.dtype == torch.float32 and lse.is_contiguous()
        dk = torch.zeros(k.shape, dtype=torch.float32, device="meta")
        dv = torch.zeros_like(dk)
        for start, end in [(20, s), (0, 20)]:
            dq = attention_backward_chunk(out[:, :, start:end], q[:, :, start:end], k, v,
                                          out[:, :, start:end], lse[:, :, start:end], docs,
                                          start, end, 0.125, dk, dv)
            assert dq.shape == (2, NQ, end - start, d) and dq.dtype == dtype
        assert dk.dtype == torch.float32


# ---------------------------------------------------------------------------------- real GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,native_gqa",
    [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)],
    ids=["bf16-flash-native-gqa", "bf16-flash-repeated-kv", "fp32-efficient"],
)
def test_cuda_matches_sdpa(dtype, native_gqa, monkeypatch):
    monkeypatch.setattr(A, "_FLASH_NATIVE_GQA", native_gqa)
    b, nq, nkv, s, d, scale = 2, 8, 2, 200, 64, 64**-0.5
    g = torch.Generator().manual_seed(0)
    q64, dout64 = (torch.randn(b, s, nq, d, generator=g, dtype=torch.float64) for _ in range(2))
    k64, v64 = (torch.randn(b, s, nkv, d, generator=g, dtype=torch.float64) for _ in range(2))
    q, k, v, dout = (x.to("cuda", dtype).transpose(1, 2) for x in (q64, k64, v64, dout64))
    pos = torch.tensor([[*range(70), *range(100), *range(30)], [*range(3), 0, *range(150), *range(45), 0]])
    bounds = [0, 37, 120, 121, s]  # uneven; lengths not multiples of 32; a one-token chunk
    for docs in (documents(None, s, b), documents(pos.cuda(), s, b)):
        mask = _mask(docs, s)
        # float64 reference on the CPU, from the same (rounded) inputs.
        qr, kr, vr = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
        ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, enable_gqa=True, scale=scale)
        ref.backward(dout.cpu().double())
        scores = qr @ kr.repeat_interleave(nq // nkv, 1).transpose(-1, -2) * scale
        ref_lse = scores.detach().masked_fill(~mask, float("-inf")).logsumexp(-1)
        # Baseline: sdpa on the GPU in the same dtype.
        qb, kb, vb = (x.detach().requires_grad_() for x in (q, k, v))
        base = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask.cuda(), enable_gqa=True, scale=scale)
        base.backward(dout)

        out, lse = attention_forward(q, k, v, docs, scale)
        assert out.transpose(1, 2).is_contiguous() and lse.is_contiguous() and lse.dtype == torch.float32
        dk = torch.zeros(k.shape, dtype=torch.float32, device="cuda")
        dv = torch.zeros_like(dk)
        dqs, snapshots = [], []
        for start, end in reversed(list(zip(bounds, bounds[1:]))):
            sl = slice(start, end)
            dqs.insert(0, attention_backward_chunk(dout[:, :, sl], q[:, :, sl], k, v, out[:, :, sl],
                                                   lse[:, :, sl], docs, start, end, scale, dk, dv))
            snapshots.append((sl, dk[:, :, sl].clone(), dv[:, :, sl].clone()))
        dq = torch.cat(dqs, dim=2)
        for sl, sk, sv in snapshots:  # rows final right after their chunk
            assert torch.equal(sk, dk[:, :, sl]) and torch.equal(sv, dv[:, :, sl])

        # Floors far below any indexing or masking mistake; fp32 runs the memory-efficient
        # kernel, whose fp32 GEMMs are 3xTF32 on sm80+.
        floor = 1e-2 if dtype == torch.bfloat16 else 1e-4
        for name, x, ref_x, base_x in [
            ("out", out, ref.detach(), base.detach()), ("dq", dq, qr.grad, qb.grad),
            ("dk", dk, kr.grad, kb.grad), ("dv", dv, vr.grad, vb.grad),
        ]:
            err, base_err = _rel(x.cpu(), ref_x), _rel(base_x.cpu(), ref_x)
            assert err <= max(2 * base_err, floor), (name, err, base_err)
        assert _rel(lse.cpu(), ref_lse) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nq, nkv", [(32, 8), (8, 8)])
def test_the_planners_attention_backward_workspace_is_what_the_gpu_branch_allocates(dtype, nq, nkv):
    """The GPU branch of a chunk's attention backward run on the meta device (nothing computed, every buffer
    allocated, and what the flash kernel allocates inside itself, which only its source shows, held around the
    call as a dry run does): the peak of what it allocates is the planner's description, item for item, with the
    earlier keys in one block and in blocks of the chunk's length (what the runtime passes). At Llama-3-8B / 128K,
    the last chunk's kernel alone would need ~2.1 GB for the dK/dV of its 32 query heads over every earlier key;
    in key blocks, 0.13 GB."""
    from longtune.offload.live_bytes import LiveBytes
    from longtune.planner.inventory import LayerShape, attention_backward_workspace
    from longtune.planner.problem import ModelShape, layer_workspace

    d, s, n = 128, 2048, 256
    q = torch.empty(1, n, nq, d, device="meta", dtype=dtype).transpose(1, 2)
    k, v = (torch.empty(1, nkv, s, d, device="meta", dtype=dtype) for _ in range(2))
    out, dout = torch.empty_like(q), torch.empty_like(q)
    lse = torch.empty(1, nq, n, device="meta", dtype=torch.float32)
    dk, dv = (torch.zeros(1, nkv, s, d, device="meta", dtype=torch.float32) for _ in range(2))
    shape = LayerShape(nq * d, 4 * nq * d, nq, nkv, d, dtype=str(dtype).removeprefix("torch."))
    for key_block, keys in ((None, s - n), (n, n)):
        with LiveBytes() as allocated:
            attention_backward_chunk(dout, q, k, v, out, lse, [[(0, s)]], s - n, s, d ** -0.5, dk, dv, key_block)
        items = attention_backward_workspace(shape, keys, n)
        assert allocated.peak == pytest.approx(sum(items.values()), abs=64)  # (the kernels' RNG seed and offset: 24 B)

    llama8b = ModelShape.from_hf_config({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                                         "num_hidden_layers": 32, "num_attention_heads": 32,
                                         "num_key_value_heads": 8, "vocab_size": 128256}, "bfloat16")
    tokens, chunks = 131072, 16
    saved = {c: 0.0 for c in ("input", "pre", "attn", "post")}
    assert attention_backward_workspace(llama8b.layer, tokens - tokens // chunks, tokens // chunks)["kernel_dkv"] > 2e9
    attention = attention_backward_workspace(llama8b.layer, tokens // chunks, tokens // chunks)
    assert attention["kernel_dkv"] < 0.14e9
    k_v_and_sums = tokens * (2 * 1024 * 2 + 2 * 1024 * 4)
    assert layer_workspace(llama8b, tokens, chunks, saved)[2] >= k_v_and_sums + sum(attention.values())
