"""Fused linear + cross-entropy: the Triton path (under the interpreter on CPU) and the chunked torch
reference against F.cross_entropy on the full logits; the full logits never exist."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from longtune.kernels import fused_ce as fc

N, H, V = 37, 32, 500  # V is not a multiple of any power-of-two block
FP32 = dict(atol=1e-5, rtol=5e-4)  # Liger's fp32 tolerances
FP16 = dict(atol=1e-3, rtol=1e-2)
BF16 = dict(atol=5e-3, rtol=5e-2)

needs_triton = pytest.mark.skipif(not fc.use_triton(torch.empty(0)) or fc.triton is None,
                                  reason="Triton cannot run here (no GPU and no TRITON_INTERPRET=1)")
BACKENDS = [pytest.param("triton", marks=needs_triton), "reference"]


def fused(backend):
    return fc.fused_linear_cross_entropy if backend == "triton" else fc.fused_linear_cross_entropy_reference


def make(n=N, h=H, v=V, dtype=torch.float32, bias=True, ignore_every=5, scale=0.1, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * scale).to(device, dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * scale).to(device, dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, b, labels.to(device)


def run(fn, hidden, weight, bias, labels, grad_scale=1.0, **kw):
    """loss and the grads of (loss * grad_scale) w.r.t. hidden, weight, bias."""
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    for t in leaves:
        t.grad = None
    loss = fn(hidden, weight, labels, bias=bias, **kw)
    (loss * grad_scale).backward()
    return [loss.detach()] + [t.grad.clone() for t in leaves]


def truth(hidden, weight, bias, labels, grad_scale=1.0, **kw):
    """Naive CE on fp32 copies of the inputs (so low-precision runs are judged against exact math)."""
    up = [t.detach().float().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    return run(fc.linear_cross_entropy_naive, *up, labels, grad_scale=grad_scale, **kw)


def assert_close(got, want, tol):
    assert len(got) == len(want)
    for name, g, w in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        torch.testing.assert_close(g.float(), w.float(), **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size,block", [(None, None), (8, 128), (16, None), (37, 128), (64, None)])
def test_matches_naive_fp32(backend, chunk_size, block, monkeypatch):
    if block:  # several vocabulary blocks per row, the last one partial (500 = 3 * 128 + 116)
        monkeypatch.setattr(fc, "MAX_BLOCK_V", block)
    hidden, weight, bias, labels = make()
    got = run(fused(backend), hidden, weight, bias, labels, grad_scale=3.0, chunk_size=chunk_size)
    assert_close(got, truth(hidden, weight, bias, labels, grad_scale=3.0), FP32)
    assert hidden.grad.dtype == weight.grad.dtype == bias.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_large_logits_3d_input(backend, monkeypatch):
    """Logits of a few hundred (the online max must matter), no bias, [B, T, H] hidden."""
    monkeypatch.setattr(fc, "MAX_BLOCK_V", 128)
    hidden, weight, _, labels = make(bias=False, scale=30.0, seed=1)
    hidden3 = hidden.detach().view(1, N, H).requires_grad_()
    got = run(fused(backend), hidden3, weight, None, labels.view(1, N), chunk_size=16)
    want = truth(hidden, weight, None, labels)
    assert got[1].shape == (1, N, H)
    assert_close([got[0], got[1].view(N, H), got[2]], want, FP32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction,num_items", [("sum", None), ("mean", 50), ("mean", "tensor")])
def test_reductions_and_num_items_in_batch(backend, reduction, num_items):
    hidden, weight, bias, labels = make(seed=2)
    if num_items == "tensor":
        num_items = torch.tensor(123)
    kw = dict(reduction=reduction, num_items_in_batch=num_items)
    got = run(fused(backend), hidden, weight, bias, labels, chunk_size=16, **kw)
    assert_close(got, truth(hidden, weight, bias, labels, **kw), FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_and_an_all_ignored_chunk(backend, monkeypatch):
    hidden, weight, bias, labels = make(seed=3)
    labels[8:16] = -100  # the whole second chunk
    seen = []
    gemm = fc._chunk_logits
    monkeypatch.setattr(fc, "_chunk_logits", lambda h, *a: seen.append(h.shape[0]) or gemm(h, *a))
    got = run(fused(backend), hidden, weight, bias, labels, grad_scale=0.5, chunk_size=8)
    assert seen == [8, 8, 8, 5]  # 5 chunks, the all-ignored one skipped (no GEMM)
    assert_close(got, truth(hidden, weight, bias, labels, grad_scale=0.5), FP32)
    assert torch.all(hidden.grad[8:16] == 0) and torch.all(hidden.grad[::5] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_input(backend):
    """Nothing to average: "mean" gives nan like torch (zero grads, as torch's); with num_items_in_batch
    it is 0 with zero grads, like transformers; "sum" gives 0."""
    hidden, weight, bias, labels = make(seed=4)
    labels[:] = -100
    loss, gh, gw, gb = run(fused(backend), hidden, weight, bias, labels, chunk_size=16)
    naive = truth(hidden, weight, bias, labels)
    assert torch.isnan(loss) and torch.isnan(naive[0])
    assert_close([gh, gw, gb], naive[1:], FP32)
    assert not gh.any() and not gw.any() and not gb.any()
    for kw in (dict(num_items_in_batch=10), dict(reduction="sum")):
        loss, gh, gw, gb = run(fused(backend), hidden, weight, bias, labels, chunk_size=16, **kw)
        assert loss.item() == 0.0 == truth(hidden, weight, bias, labels, **kw)[0].item()
        assert not gh.any() and not gw.any() and not gb.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_inputs(backend):
    hidden, weight, bias, labels = make(dtype=torch.float16, seed=5)
    got = run(fused(backend), hidden, weight, bias, labels, grad_scale=3.0, chunk_size=16)
    assert got[0].dtype == torch.float32
    assert hidden.grad.dtype == weight.grad.dtype == bias.grad.dtype == torch.float16
    assert_close(got, truth(hidden, weight, bias, labels, grad_scale=3.0), FP16)


@needs_triton
def test_triton_path_runs(monkeypatch):
    calls = {"triton": 0, "torch": 0}
    tri, ref = fc._chunk_ce_triton, fc._chunk_ce_torch

    def spy(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(fc, "_chunk_ce_triton", spy("triton", tri))
    monkeypatch.setattr(fc, "_chunk_ce_torch", spy("torch", ref))
    hidden, weight, bias, labels = make(seed=6, ignore_every=0)
    fc.fused_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=16).backward()
    assert calls == {"triton": 3, "torch": 0}
    fc.fused_linear_cross_entropy_reference(hidden, weight, labels, bias=bias, chunk_size=16).backward()
    assert calls == {"triton": 3, "torch": 3}
    monkeypatch.setattr(fc, "use_triton", lambda t: False)  # where Triton cannot run: the reference
    fc.fused_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=16).backward()
    assert calls == {"triton": 3, "torch": 6}


class LogitsWatch(TorchDispatchMode):
    """Largest tensor any aten op produces that has a vocabulary dim, weight-shaped ones excepted."""

    def __init__(self, v, h):
        super().__init__()
        self.v, self.h, self.largest = v, h, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and self.v in t.shape and tuple(t.shape) not in ((self.v, self.h), (self.h, self.v)):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_logits_never_exist(backend):
    hidden, weight, bias, labels = make(seed=7)
    with LogitsWatch(V, H) as naive:
        fc.linear_cross_entropy_naive(hidden, weight, labels, bias=bias).backward()
    assert naive.largest >= N * V  # the watch sees full logits when they are built
    for chunk in (8, 16):
        with LogitsWatch(V, H) as watch:
            (fused(backend)(hidden, weight, labels, bias=bias, chunk_size=chunk) * 2).backward()
        assert 0 < watch.largest <= chunk * V


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_and_no_grad(backend):
    hidden, weight, bias, labels = make(seed=8)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    loss = fused(backend)(hidden, weight, labels, bias=bias, chunk_size=16)
    loss.backward()
    want = truth(hidden, weight, bias, labels)
    assert weight.grad is None and bias.grad is None
    assert_close([loss.detach(), hidden.grad], want[:2], FP32)
    with torch.no_grad():
        loss = fused(backend)(hidden, weight, labels, bias=bias, chunk_size=16)
    assert loss.grad_fn is None
    assert_close([loss], want[:1], FP32)


def test_errors():
    hidden, weight, bias, labels = make(seed=9)
    f = fc.fused_linear_cross_entropy_reference
    with pytest.raises(ValueError, match="reduction"):
        f(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        f(hidden, weight, labels, reduction="sum", num_items_in_batch=3)
    with pytest.raises(ValueError, match="dtype"):
        f(hidden.detach().half(), weight, labels)
    bad = labels.clone()
    bad[3] = V
    with pytest.raises(IndexError, match="out of bounds"):
        f(hidden, weight, bad)
    loss = f(hidden, weight, labels, bias=bias)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_default_chunk_size():
    assert fc.default_chunk_size(16384, 2048, 128256) == 512  # Liger's rule: logits ~ the size of hidden
    assert fc.default_chunk_size(1 << 20, 4096, 128256) == fc.MAX_CHUNK_TOKENS  # bounded for long sequences
    assert fc.default_chunk_size(1000, 4096, 32000) == 256  # never tiny GEMMs...
    assert fc.default_chunk_size(37, 32, 500) == 37  # ...nor more than there are tokens


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [None, 1000])
def test_bf16_cuda_matches_naive(chunk_size):
    hidden, weight, bias, labels = make(n=4099, h=512, v=32003, dtype=torch.bfloat16, scale=0.05, seed=10, device="cuda")
    got = run(fc.fused_linear_cross_entropy, hidden, weight, bias, labels, grad_scale=3.0, chunk_size=chunk_size)
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    assert_close(got, truth(hidden, weight, bias, labels, grad_scale=3.0), BF16)


@pytest.mark.gpu
def test_bf16_cuda_peak_memory_an_eighth_of_naive():
    hidden, weight, _, labels = make(n=8192, h=1024, v=64000, dtype=torch.bfloat16, bias=False, seed=11, device="cuda")

    def peak(fn):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(hidden, weight, labels).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fc.fused_linear_cross_entropy(hidden, weight, labels).backward()  # compile outside the measurement
    assert peak(fc.fused_linear_cross_entropy) * 8 <= peak(fc.linear_cross_entropy_naive)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overwrite_hidden_gives_the_same_loss_and_gradients_in_hiddens_own_bytes(backend):
    """overwrite_hidden: the hidden states' gradient is written over them (the patched causal LM's loss), every
    chunk's weight gradient having read the chunk first: loss and gradients bit for bit those of a separate buffer."""
    hidden, weight, bias, labels = make()
    want = run(fc.fused_linear_cross_entropy, hidden, weight, bias, labels, grad_scale=3.0, chunk_size=8)
    states = hidden.detach().clone()
    x = states.requires_grad_()  # a leaf whose bytes the loss takes over
    inner = x.view(N, H)  # (autograd hands the gradient of this view back to the leaf: the same bytes)
    for t in (weight, bias):
        t.grad = None
    loss = fc.fused_linear_cross_entropy(inner, weight, labels, bias=bias, chunk_size=8, overwrite_hidden=True)
    (loss * 3.0).backward()
    assert torch.equal(loss.detach(), want[0])
    assert torch.equal(x.grad, want[1]) and torch.equal(weight.grad, want[2]) and torch.equal(bias.grad, want[3])
    assert x.grad.data_ptr() == states.data_ptr()  # one buffer: the states' bytes hold their gradient
