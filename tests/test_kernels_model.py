"""Whole models with every kernel on give the loss and gradients of the unpatched transformers model.

CPU, fp32, Triton under the interpreter (conftest sets TRITON_INTERPRET=1 without a GPU).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model_config
from transformers import AutoConfig, AutoModelForCausalLM

from longtune.kernels import backend
from longtune.models.patch import apply_kernels

FP32 = dict(atol=1e-5, rtol=5e-4)  # Liger's fp32 tolerances


def _inputs(vocab: int, seq: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt without loss
    labels[1, -3:] = -100
    return ids, labels


def _loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, use_cache=False, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_training_signal(plain, patched, ids, labels, **kwargs):
    expected, expected_grads = _loss_and_grads(plain, ids, labels, **kwargs)
    got, got_grads = _loss_and_grads(patched, ids, labels, **kwargs)
    assert got.logits is None, "the fused loss must not build full logits"
    torch.testing.assert_close(got.loss, expected.loss, **FP32)
    assert got_grads.keys() == expected_grads.keys()
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], **FP32, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_tiny_models_with_every_kernel_match_transformers(model_type):
    assert backend.use_triton(torch.empty(1)), "the Triton path must run in this test"
    fields = tiny_model_config(model_type)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields), attn_implementation="sdpa")
    patched = copy.deepcopy(plain)
    counts = apply_kernels(patched)
    layers = plain.config.num_hidden_layers
    norms_per_layer = 4 if model_type == "qwen3" else 2  # Qwen3 adds q_norm and k_norm
    assert counts == {"rmsnorm": norms_per_layer * layers + 1, "rope": layers, "swiglu": layers, "fused_ce": 1}
    # 12 tokens a row: the interpreter's time goes with them (a RoPE program and a loss row each)
    ids, labels = _inputs(plain.config.vocab_size, seq=12)
    _assert_same_training_signal(plain, patched, ids, labels)
    # num_items_in_batch (gradient accumulation) is honoured the same way
    _assert_same_training_signal(plain, patched, ids, labels, num_items_in_batch=50)


def test_gemma_takes_the_kernels_that_compute_it_exactly():
    """Gemma's MLP is GELU, not the swiglu kernel's formula: refused by name. Its norm (x * (1 + w) in fp32) is the
    RMSNorm kernel with offset 1; RoPE (called from stock attention through the dispatcher) and the fused loss
    are the same as for Llama: all exact."""
    from longtune.kernels import rope as rope_kernel

    fields = tiny_model_config("gemma")
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields), attn_implementation="sdpa")
    with torch.no_grad():  # GemmaRMSNorm starts at weight 0 (a scale of 1): make the offset matter
        for name, p in plain.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    with pytest.raises(ValueError, match="model.kernels.swiglu: .* gemma takes rmsnorm, rope, fused_ce"):
        apply_kernels(copy.deepcopy(plain))
    patched = copy.deepcopy(plain)
    calls = []
    original = rope_kernel.apply_rope
    rope_kernel.apply_rope = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        counts = apply_kernels(patched, swiglu=False)
        assert counts == {"rmsnorm": 2 * 2 + 1, "rope": 2, "swiglu": 0, "fused_ce": 1}
        ids, labels = _inputs(plain.config.vocab_size)
        _assert_same_training_signal(plain, patched, ids, labels)
    finally:
        rope_kernel.apply_rope = original
    assert calls, "stock attention must reach the RoPE kernel"


def test_smollm2_with_every_kernel_is_as_exact_as_plain_fp32(smollm2_dir):
    """30 real layers: both runs are measured against float64. The kernels sum in other orders, so
    they may differ from plain fp32 by rounding; they must stay as close to the exact gradients as
    plain fp32 is (within a factor), and the loss must agree to fp32 precision."""
    from longtune.trainer.config import ModelConfig
    from longtune.trainer.model import build_model

    plain = build_model(ModelConfig(path=str(smollm2_dir)))  # the GGUF's weights, saved once per session
    patched = copy.deepcopy(plain)
    apply_kernels(patched)
    exact = copy.deepcopy(plain).double()
    ids, labels = _inputs(plain.config.vocab_size, seq=16)
    # transformers' loss casts logits to fp32; the ground truth stays in float64 throughout.
    logits = exact(input_ids=ids, use_cache=False).logits
    truth_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    truth_loss.backward()
    truth_grads = {n: p.grad for n, p in exact.named_parameters()}
    plain_out, plain_grads = _loss_and_grads(plain, ids, labels)
    out, grads = _loss_and_grads(patched, ids, labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss.double(), truth_loss.detach(), atol=1e-5, rtol=1e-6)

    def worst_error(g):  # the largest relative error, over parameters, of the gradient
        return max(float((g[n].double() - truth_grads[n]).norm() / truth_grads[n].norm()) for n in truth_grads)

    plain_error, kernel_error = worst_error(plain_grads), worst_error(grads)
    assert plain_error < 1e-4, "the float64 reference itself must agree with plain fp32"
    assert kernel_error <= 5 * plain_error, f"kernels {kernel_error:.2e} vs plain fp32 {plain_error:.2e}"


def test_unpatched_models_in_the_same_process_are_untouched():
    fields = tiny_model_config("llama")
    torch.manual_seed(0)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    patched, plain = AutoModelForCausalLM.from_config(config), AutoModelForCausalLM.from_config(config)
    apply_kernels(patched)
    ids, labels = _inputs(config.vocab_size)
    out = plain(input_ids=ids, labels=labels)
    assert out.logits is not None and out.logits.shape == (2, 24, config.vocab_size)
    for module in plain.modules():
        assert "forward" not in vars(module), f"{type(module).__name__} was patched"


def test_generation_path_still_returns_logits():
    fields = tiny_model_config("llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    reference = copy.deepcopy(model)
    apply_kernels(model)
    ids, _ = _inputs(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, **FP32)


def test_unsupported_architecture_is_refused():
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    with pytest.raises(ValueError, match="kernels support"):
        apply_kernels(AutoModelForCausalLM.from_config(config))
