"""RMSNorm and SwiGLU: the Triton kernels against their torch references and transformers.

Without a GPU the kernels run under the Triton interpreter (conftest sets
TRITON_INTERPRET=1), which is slow and handles fp32/fp16 only: shapes here are
small, and the bf16 checks at model sizes are GPU-only.
"""

from __future__ import annotations

import pytest
import torch

import longtune.kernels.rmsnorm as rmsnorm_mod
import longtune.kernels.swiglu as swiglu_mod
from longtune.kernels.backend import use_triton
from longtune.kernels.rmsnorm import RMSNormFunction, rms_norm, rms_norm_reference
from longtune.kernels.swiglu import SwiGLUFunction, swiglu, swiglu_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (dtype, atol, rtol): fp32 as Liger's tighter tests; fp16 one step looser.
TOLS = {
    torch.float32: dict(atol=1e-5, rtol=5e-4),
    torch.float16: dict(atol=1e-3, rtol=1e-2),
}
BF16_TOL = dict(atol=5e-3, rtol=5e-2)

SHAPES = [(2, 7, 64), (3, 33, 96), (64,), (1, 1, 5), (4, 1)]

needs_triton = pytest.mark.skipif(
    not use_triton(torch.empty(0, device=DEVICE)), reason="Triton cannot run here (no GPU, no interpreter)"
)


def close(actual, expected, dtype=None, **tol):
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, **(tol or TOLS[dtype or expected.dtype]))


def make_weight(hidden, dtype, offset, gen=None):
    # Llama-style weights sit around 1, Gemma-style (applied as 1 + w) around 0.
    w = torch.randn(hidden, generator=gen) * 0.5 + (1.0 if offset == 0.0 else 0.0)
    return w.to(device=DEVICE, dtype=dtype)


def rms_weight_grad_exact(x, dy, eps, offset):
    """dL/dweight as a float64 sum over rows of the same terms the forward multiplied, in x's dtype."""
    x32 = x.float()
    h = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        h = h.to(x.dtype)  # Llama multiplies the weight by h already rounded to the input dtype
    return (dy.double() * h.double()).reshape(-1, x.shape[-1]).sum(0).to(x.dtype)


def run_rms(fn, x, w, dy, eps=1e-6, offset=0.0):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w, eps, offset)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def run_swiglu(fn, g, u, dy):
    g = g.detach().clone().requires_grad_(True)
    u = u.detach().clone().requires_grad_(True)
    y = fn(g, u)
    y.backward(dy)
    return y.detach(), g.grad, u.grad


class _LaunchCounter:
    """Stands in for a @triton.jit kernel and counts `kernel[grid](...)` launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _refuse(*args, **kwargs):
    raise AssertionError("this path must not run")


# ----------------------------------------------------------------------------- RMSNorm


@needs_triton
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_matches_reference(shape, dtype, offset):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    w = make_weight(shape[-1], dtype, offset, gen)
    dy = torch.randn(shape, generator=gen).to(DEVICE, dtype)

    y, dx, dw = run_rms(RMSNormFunction.apply, x, w, dy, 1e-6, offset)
    y_ref, dx_ref, dw_ref = run_rms(rms_norm_reference, x, w, dy, 1e-6, offset)
    close(y, y_ref)
    close(dx, dx_ref)
    if dtype == torch.float16 and offset == 0.0:
        # Llama's weight grad in autograd rounds every dy * h term to fp16 before the sum over
        # rows (here 99), one ulp off now and then; the kernel sums in fp32. Judge it against
        # the exact sum, and the reference only loosely.
        close(dw, rms_weight_grad_exact(x, dy, 1e-6, offset))
        close(dw, dw_ref, atol=1e-2, rtol=1e-2)
    else:
        close(dw, dw_ref)


@needs_triton
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rms_norm_noncontiguous_input_and_grad(offset):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 48, 7, generator=gen).to(DEVICE).transpose(1, 2)  # [2, 7, 48], last dim strided
    assert not x.is_contiguous()
    w = make_weight(48, torch.float32, offset, gen)
    outs = []
    for fn in (rms_norm, rms_norm_reference):
        xx = x.detach().clone().requires_grad_(True)  # clone keeps the strides
        ww = w.detach().clone().requires_grad_(True)
        y = fn(xx, ww, 1e-5, offset)
        (y * 0.5).sum().backward()  # dy: an expanded (stride 0) tensor
        outs.append((y.detach(), xx.grad, ww.grad))
    for got, want in zip(*outs):
        close(got, want)


@needs_triton
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rms_norm_mixed_dtypes(offset):
    """fp16 activations with an fp32 weight: Llama promotes to fp32, Gemma keeps the input dtype."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 32, generator=gen).to(DEVICE, torch.float16)
    w = make_weight(32, torch.float32, offset, gen)
    out_dtype = torch.float32 if offset == 0.0 else torch.float16
    dy = torch.randn(3, 5, 32, generator=gen).to(DEVICE, out_dtype)
    y, dx, dw = run_rms(rms_norm, x, w, dy, 1e-6, offset)
    y_ref, dx_ref, dw_ref = run_rms(rms_norm_reference, x, w, dy, 1e-6, offset)
    assert y.dtype == out_dtype and dx.dtype == torch.float16 and dw.dtype == torch.float32
    close(y, y_ref, torch.float16)
    close(dx, dx_ref, torch.float16)
    close(dw, dw_ref, torch.float16)


@needs_triton
def test_rms_norm_empty_and_no_weight_grad():
    w = torch.ones(16, device=DEVICE)
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)

    # A frozen weight: only x gets a gradient.
    x = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    rms_norm(x, w).square().sum().backward()
    assert w.grad is None and x.grad is not None


@needs_triton
def test_rms_norm_runs_the_triton_kernels(monkeypatch):
    fwd = _LaunchCounter(rmsnorm_mod._rms_norm_fwd_kernel)
    bwd = _LaunchCounter(rmsnorm_mod._rms_norm_bwd_kernel)
    monkeypatch.setattr(rmsnorm_mod, "_rms_norm_fwd_kernel", fwd)
    monkeypatch.setattr(rmsnorm_mod, "_rms_norm_bwd_kernel", bwd)
    monkeypatch.setattr(rmsnorm_mod, "rms_norm_reference", _refuse)
    x = torch.randn(2, 3, 32, device=DEVICE, requires_grad=True)
    w = torch.ones(32, device=DEVICE, requires_grad=True)
    rms_norm(x, w).sum().backward()
    assert (fwd.launches, bwd.launches) == (1, 1)


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rms_norm_falls_back_to_reference(monkeypatch, offset):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 24, generator=gen).to(DEVICE)
    w = make_weight(24, torch.float32, offset, gen)
    dy = torch.randn(2, 5, 24, generator=gen).to(DEVICE)
    want = run_rms(rms_norm_reference, x, w, dy, 1e-6, offset)

    monkeypatch.setattr(rmsnorm_mod, "use_triton", lambda t: False)
    monkeypatch.setattr(RMSNormFunction, "apply", _refuse)
    got = run_rms(rms_norm, x, w, dy, 1e-6, offset)
    for g, r in zip(got, want):
        assert torch.equal(g, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rms_norm_exact_against_transformers(dtype):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 40, generator=gen).to(DEVICE, dtype)
    for module, offset in ((LlamaRMSNorm(40, eps=1e-5), 0.0), (GemmaRMSNorm(40, eps=1e-5), 1.0)):
        module = module.to(DEVICE, dtype)
        with torch.no_grad():
            module.weight.copy_(make_weight(40, dtype, offset, gen))
        want = module(x)
        assert torch.equal(rms_norm_reference(x, module.weight, 1e-5, offset), want)
        if use_triton(x):
            close(rms_norm(x, module.weight, 1e-5, offset), want)


@needs_triton
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rms_norm_grads_against_transformers_module(offset):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(5)
    module = (LlamaRMSNorm if offset == 0.0 else GemmaRMSNorm)(40, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        module.weight.copy_(make_weight(40, torch.float32, offset, gen))
    x = torch.randn(3, 11, 40, generator=gen).to(DEVICE)
    dy = torch.randn(3, 11, 40, generator=gen).to(DEVICE)

    xm = x.clone().requires_grad_(True)
    ym = module(xm)
    ym.backward(dy)
    y, dx, dw = run_rms(rms_norm, x, module.weight, dy, 1e-6, offset)
    close(y, ym.detach())
    close(dx, xm.grad)
    close(dw, module.weight.grad)


# ----------------------------------------------------------------------------- SwiGLU

SWIGLU_SHAPES = [(2, 7, 64), (3, 33, 96), (5,), (1,), (2, 1031)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_swiglu_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(10)
    g = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype)  # reach silu's saturated tails
    u = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    for got, want in zip(run_swiglu(SwiGLUFunction.apply, g, u, dy), run_swiglu(swiglu_reference, g, u, dy)):
        close(got, want)


@needs_triton
def test_swiglu_noncontiguous_and_empty():
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(2, 40, 6, generator=gen).to(DEVICE)
    g, u = base[..., :3].transpose(1, 2), base[..., 3:].transpose(1, 2)  # strided views of one tensor
    outs = []
    for fn in (swiglu, swiglu_reference):
        gg, uu = g.detach().clone().requires_grad_(True), u.detach().clone().requires_grad_(True)
        y = fn(gg, uu)
        y.sum().backward()
        outs.append((y.detach(), gg.grad, uu.grad))
    for got, want in zip(*outs):
        close(got, want)

    e = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    y = swiglu(e, e)
    y.sum().backward()
    assert y.shape == (0, 8) and e.grad.shape == (0, 8)


@needs_triton
def test_swiglu_backward_leaves_inputs_intact():
    g = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    u = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    g0, u0 = g.detach().clone(), u.detach().clone()
    swiglu(g, u).sum().backward()
    assert torch.equal(g.detach(), g0) and torch.equal(u.detach(), u0)


@needs_triton
def test_swiglu_runs_the_triton_kernels(monkeypatch):
    fwd = _LaunchCounter(swiglu_mod._swiglu_fwd_kernel)
    bwd = _LaunchCounter(swiglu_mod._swiglu_bwd_kernel)
    monkeypatch.setattr(swiglu_mod, "_swiglu_fwd_kernel", fwd)
    monkeypatch.setattr(swiglu_mod, "_swiglu_bwd_kernel", bwd)
    monkeypatch.setattr(swiglu_mod, "swiglu_reference", _refuse)
    g = torch.randn(2, 3, 32, device=DEVICE, requires_grad=True)
    u = torch.randn(2, 3, 32, device=DEVICE, requires_grad=True)
    swiglu(g, u).sum().backward()
    assert (fwd.launches, bwd.launches) == (1, 1)


def test_swiglu_falls_back_to_reference(monkeypatch):
    gen = torch.Generator().manual_seed(12)
    g, u, dy = (torch.randn(2, 5, 24, generator=gen).to(DEVICE) for _ in range(3))
    want = run_swiglu(swiglu_reference, g, u, dy)
    monkeypatch.setattr(swiglu_mod, "use_triton", lambda t: False)
    monkeypatch.setattr(SwiGLUFunction, "apply", _refuse)
    got = run_swiglu(swiglu, g, u, dy)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_swiglu_exact_against_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(13)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu")).to(DEVICE)
    x = torch.randn(2, 9, 32, device=DEVICE)
    with torch.no_grad():
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        want = mlp.act_fn(gate) * up
        assert torch.equal(swiglu_reference(gate, up), want)
        assert torch.equal(mlp.down_proj(swiglu_reference(gate, up)), mlp(x))
        if use_triton(x):
            close(swiglu(gate, up), want)
            close(mlp.down_proj(swiglu(gate, up)), mlp(x))


# ----------------------------------------------------------------------------- bf16 at model sizes (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rms_norm_bf16_large(offset):
    rows, hidden, dt = 8192, 4096, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(20)
    x = torch.randn(rows, hidden, device="cuda", generator=gen).to(dt)
    w = (torch.randn(hidden, device="cuda", generator=gen) * 0.5 + (1.0 if offset == 0.0 else 0.0)).to(dt)
    dy = torch.randn(rows, hidden, device="cuda", generator=gen).to(dt)
    y, dx, dw = run_rms(rms_norm, x, w, dy, 1e-6, offset)
    y_ref, dx_ref, dw_ref = run_rms(rms_norm_reference, x, w, dy, 1e-6, offset)
    close(y, y_ref, **BF16_TOL)
    close(dx, dx_ref, **BF16_TOL)
    # Llama's bf16 reference rounds each dy * h to bf16 before summing 8K rows, which puts it
    # up to ~0.5 off near zero; judge dW against the exact sum (float64) of the same terms.
    close(dw, rms_weight_grad_exact(x, dy, 1e-6, offset), **BF16_TOL)
    close(dw, dw_ref, atol=1.0, rtol=5e-2)


@pytest.mark.gpu
def test_swiglu_bf16_large():
    shape, dt = (8192, 4096), torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(21)
    g = (torch.randn(shape, device="cuda", generator=gen) * 2).to(dt)
    u = torch.randn(shape, device="cuda", generator=gen).to(dt)
    dy = torch.randn(shape, device="cuda", generator=gen).to(dt)
    for got, want in zip(run_swiglu(swiglu, g, u, dy), run_swiglu(swiglu_reference, g, u, dy)):
        close(got, want, **BF16_TOL)
