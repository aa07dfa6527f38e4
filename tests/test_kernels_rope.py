"""RoPE: the Triton kernel (interpreter on CPU, CUDA on a GPU) against its torch reference and transformers."""

from __future__ import annotations

import inspect

import pytest
import torch

from longtune.kernels import rope
from longtune.kernels.rope import apply_rope, apply_rope_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(atol=1e-5, rtol=5e-4),
    torch.float16: dict(atol=1e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-3, rtol=5e-2),
}


def rotary_cos_sin(batch: int, seq: int, head_dim: int, dtype, base: float = 10000.0, offset: int = 0):
    """cos/sin [batch, seq, head_dim] the way transformers' rotary embeddings make them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    pos = torch.arange(offset, offset + seq, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    return (cos.expand(batch, seq, head_dim).to(DEVICE, dtype), sin.expand(batch, seq, head_dim).to(DEVICE, dtype))


def qk(batch, seq, n_qh, n_kh, head_dim, dtype, transformers_layout=True):
    """q [b, h, s, d] and k [b, kv_h, s, d]; by default non-contiguous, as transformers makes them."""
    if transformers_layout:  # q_proj(x).view(b, s, h, d).transpose(1, 2)
        q = torch.randn(batch, seq, n_qh * head_dim, device=DEVICE, dtype=dtype).view(batch, seq, n_qh, head_dim).transpose(1, 2)
        k = torch.randn(batch, seq, n_kh * head_dim, device=DEVICE, dtype=dtype).view(batch, seq, n_kh, head_dim).transpose(1, 2)
    else:
        q = torch.randn(batch, n_qh, seq, head_dim, device=DEVICE, dtype=dtype)
        k = torch.randn(batch, n_kh, seq, head_dim, device=DEVICE, dtype=dtype)
    return q.requires_grad_(), k.requires_grad_()


def fwd_bwd(fn, q, k, cos, sin, **kwargs):
    """Outputs and (dq, dk) for a fixed upstream gradient."""
    q_, k_ = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qo, ko = fn(q_, k_, cos, sin, **kwargs)
    g = torch.Generator(device="cpu").manual_seed(1)
    gq = torch.randn(qo.shape, generator=g).to(qo.device, qo.dtype)
    gk = torch.randn(ko.shape, generator=g).to(ko.device, ko.dtype)
    torch.autograd.backward((qo, ko), (gq, gk))
    return qo, ko, q_.grad, k_.grad


def check_against_reference(q, k, cos, sin, tol, **kwargs):
    out = fwd_bwd(apply_rope, q, k, cos, sin, **kwargs)
    ref = fwd_bwd(apply_rope_reference, q, k, cos, sin, **kwargs)
    for name, a, r in zip(("q_embed", "k_embed", "dq", "dk"), out, ref):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        torch.testing.assert_close(a, r, **tol, msg=lambda m: f"{name}: {m}")
    return out


@pytest.fixture
def spy(monkeypatch):
    """Counts the Triton launches and the reference calls."""
    calls = {"triton": 0, "reference": 0}
    launch, reference = rope._rope_launch, rope.apply_rope_reference

    def counting_launch(*a, **kw):
        calls["triton"] += 1
        return launch(*a, **kw)

    def counting_reference(*a, **kw):
        calls["reference"] += 1
        return reference(*a, **kw)

    monkeypatch.setattr(rope, "_rope_launch", counting_launch)
    monkeypatch.setattr(rope, "apply_rope_reference", counting_reference)
    return calls


# ------------------------------------------------------------------ CPU (interpreter) and GPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "batch, seq, n_qh, n_kh, head_dim",
    [
        (1, 8, 4, 4, 64),     # MHA
        (2, 17, 8, 2, 64),    # GQA, batch 2, odd seq
        (2, 13, 8, 2, 128),   # head_dim 128
        (1, 5, 3, 1, 128),    # odd head count, MQA
    ],
)
@pytest.mark.parametrize("transformers_layout", [True, False], ids=["view_transpose", "contiguous"])
def test_matches_reference(batch, seq, n_qh, n_kh, head_dim, dtype, transformers_layout, spy):
    q, k = qk(batch, seq, n_qh, n_kh, head_dim, dtype, transformers_layout)
    assert q.is_contiguous() != transformers_layout
    cos, sin = rotary_cos_sin(batch, seq, head_dim, dtype, offset=3)
    check_against_reference(q, k, cos, sin, TOL[dtype])
    assert spy == {"triton": 2, "reference": 0}  # forward and backward both ran the kernel


def test_cos_sin_broadcast_over_batch_and_arbitrary_halves(spy):
    """cos/sin of batch 1 (one position_ids row for the batch); halves that differ are still exact."""
    q, k = qk(2, 9, 8, 2, 64, torch.float32)
    cos, sin = torch.randn(1, 9, 64, device=DEVICE), torch.randn(1, 9, 64, device=DEVICE)
    check_against_reference(q, k, cos, sin, TOL[torch.float32])
    assert spy == {"triton": 2, "reference": 0}


def test_unsqueeze_dim_2_layout(spy):
    """q/k as [b, s, h, d] with cos/sin unsqueezed at dim 2."""
    q = torch.randn(2, 7, 8, 64, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 7, 2, 64, device=DEVICE, requires_grad=True)
    cos, sin = rotary_cos_sin(2, 7, 64, torch.float32)
    check_against_reference(q, k, cos, sin, TOL[torch.float32], unsqueeze_dim=2)
    assert spy == {"triton": 2, "reference": 0}


def test_exact_against_transformers_with_llama_rotary_embedding():
    """apply_rope == transformers' apply_rotary_pos_emb, cos/sin from a real LlamaRotaryEmbedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rotary = LlamaRotaryEmbedding(cfg).to(DEVICE)
    batch, seq = 2, 11
    x = torch.randn(batch, seq, cfg.hidden_size, device=DEVICE)
    position_ids = torch.stack([torch.arange(seq), torch.arange(5, 5 + seq)]).to(DEVICE)
    cos, sin = rotary(x, position_ids)
    assert cos.shape == (batch, seq, head_dim)
    q, k = qk(batch, seq, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, torch.float32)

    # Exact under the interpreter (same fp32 operations); FMA contraction may round differently on a GPU.
    tol = TOL[torch.float32] if DEVICE == "cuda" else dict(atol=0.0, rtol=0.0)
    out = fwd_bwd(apply_rope, q, k, cos, sin)
    ref = fwd_bwd(apply_rotary_pos_emb, q, k, cos, sin)
    for a, r in zip(out, ref):
        torch.testing.assert_close(a, r, **tol)


def test_drop_in_signature_and_position_ids_ignored():
    params = list(inspect.signature(apply_rope).parameters)
    assert params == ["q", "k", "cos", "sin", "position_ids", "unsqueeze_dim"]
    q, k = qk(1, 6, 4, 2, 64, torch.float32)
    cos, sin = rotary_cos_sin(1, 6, 64, torch.float32)
    a = apply_rope(q, k, cos, sin)
    b = apply_rope(q, k, cos, sin, position_ids=torch.arange(6).view(1, 6) + 100, unsqueeze_dim=1)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_swapped_into_a_transformers_model(model_type, monkeypatch, spy):
    """A tiny model with apply_rope patched in gives the same logits and gradients."""
    import importlib

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(DEVICE)
    ids = torch.randint(0, 128, (2, 13), device=DEVICE)

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), [p.grad.clone() for p in model.parameters()]

    ref_logits, ref_grads = run()
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    monkeypatch.setattr(module, "apply_rotary_pos_emb", apply_rope)
    logits, grads = run()
    assert spy == {"triton": 2 * cfg.num_hidden_layers, "reference": 0}
    torch.testing.assert_close(logits, ref_logits, **TOL[torch.float32])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL[torch.float32])


def test_triton_path_really_runs(spy):
    q, k = qk(2, 5, 8, 2, 64, torch.float32)
    cos, sin = rotary_cos_sin(2, 5, 64, torch.float32)
    qo, ko = apply_rope(q, k, cos, sin)
    assert spy == {"triton": 1, "reference": 0}
    assert type(qo.grad_fn).__name__ == "RoPEFunctionBackward" and qo.grad_fn is ko.grad_fn
    (qo.sum() + ko.sum()).backward()
    assert spy == {"triton": 2, "reference": 0}


def test_reference_when_use_triton_is_false(monkeypatch, spy):
    monkeypatch.setattr(rope, "use_triton", lambda t: False)
    q, k = qk(2, 5, 8, 2, 64, torch.float32)
    cos, sin = rotary_cos_sin(2, 5, 64, torch.float32)
    qo, ko = apply_rope(q, k, cos, sin)
    (qo.sum() + ko.sum()).backward()
    assert spy == {"triton": 0, "reference": 1}
    assert "RoPEFunction" not in type(qo.grad_fn).__name__


def test_cos_sin_requiring_grad_fall_back_to_reference(spy):
    q, k = qk(1, 5, 4, 2, 64, torch.float32)
    cos, sin = rotary_cos_sin(1, 5, 64, torch.float32)
    cos.requires_grad_()
    qo, ko = apply_rope(q, k, cos, sin)
    (qo.sum() + ko.sum()).backward()
    assert spy == {"triton": 0, "reference": 1}
    assert cos.grad is not None


def test_mixed_dtypes_follow_the_reference_promotion(spy):
    """fp16 q/k with fp32 cos/sin (autocast over fp32 weights): fp32 outputs, fp16 gradients, as the reference."""
    q, k = qk(2, 7, 8, 2, 64, torch.float16)
    cos, sin = rotary_cos_sin(2, 7, 64, torch.float32)
    qo, ko, dq, dk = check_against_reference(q, k, cos, sin, TOL[torch.float16])
    assert qo.dtype == ko.dtype == torch.float32 and dq.dtype == dk.dtype == torch.float16
    assert spy == {"triton": 2, "reference": 0}


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's dtype limit")
def test_bf16_under_the_interpreter_uses_the_reference(spy):
    q, k = qk(1, 5, 4, 2, 64, torch.bfloat16)
    cos, sin = rotary_cos_sin(1, 5, 64, torch.bfloat16)
    qo, _ = apply_rope(q, k, cos, sin)
    assert spy == {"triton": 0, "reference": 1} and qo.dtype == torch.bfloat16


# ------------------------------------------------------------------ GPU only: bf16, larger shapes


@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch, seq, n_qh, n_kh, head_dim",
    [(2, 2048, 32, 8, 128), (1, 4099, 16, 2, 64), (4, 1024, 12, 12, 64), (1, 8192, 28, 4, 128)],
)
@pytest.mark.parametrize("transformers_layout", [True, False], ids=["view_transpose", "contiguous"])
def test_bf16_gpu(batch, seq, n_qh, n_kh, head_dim, transformers_layout, spy):
    q, k = qk(batch, seq, n_qh, n_kh, head_dim, torch.bfloat16, transformers_layout)
    cos, sin = rotary_cos_sin(batch, seq, head_dim, torch.bfloat16)
    check_against_reference(q, k, cos, sin, TOL[torch.bfloat16])
    assert spy == {"triton": 2, "reference": 0}


@pytest.mark.gpu
def test_bf16_gpu_autocast_mixed_dtypes(spy):
    """bf16 q/k from autocast with fp32 cos/sin: fp32 outputs, bf16 gradients."""
    q, k = qk(2, 2048, 32, 8, 128, torch.bfloat16)
    cos, sin = rotary_cos_sin(2, 2048, 128, torch.float32)
    qo, ko, dq, dk = check_against_reference(q, k, cos, sin, TOL[torch.bfloat16])
    assert qo.dtype == torch.float32 and dq.dtype == torch.bfloat16
    assert spy == {"triton": 2, "reference": 0}
