"""The analytic activation inventory (planner/inventory.py) equals what autograd saves (planner/profile.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import cli_env

from longtune.planner.inventory import LayerShape, class_bytes_per_token, layer_inventory
from longtune.planner.profile import measure_layer

PARTS = ("input", "pre", "attn", "post")


def tiny(model_type: str) -> dict:
    """GQA (8 query heads, 2 kv heads); Qwen3 also gets head_dim != hidden / heads."""
    cfg = {"model_type": model_type, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8,
           "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 512}
    if model_type == "qwen3":
        cfg["head_dim"] = 16
    if model_type == "gemma":
        cfg["head_dim"] = 8  # GemmaConfig's default is 256
    return cfg


def by_part(tensors) -> dict[str, float]:
    out: dict[str, float] = {}
    for t in tensors:
        out[t.part] = out.get(t.part, 0.0) + t.bytes_per_token
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral", "gemma"])
def test_analytic_matches_measured(model_type, dtype):
    cfg = tiny(model_type)
    measured = measure_layer(cfg, dtype, seq_len=32)
    analytic = class_bytes_per_token(LayerShape.from_hf_config(cfg, dtype), runtime=False)
    got = by_part(measured)

    assert set(got) <= {*PARTS, "shared"}, got  # every saved storage was attributed to a known producer
    assert any("flash" in t.name for t in measured if t.part == "attn")  # flash kernel, not the math path
    for part in (*PARTS, "shared"):
        assert got.get(part, 0.0) == pytest.approx(analytic[part], rel=0.01), (part, got, analytic)
    total = sum(got.get(p, 0.0) for p in PARTS)
    assert total == pytest.approx(sum(analytic[p] for p in PARTS), rel=0.01)
    # dtype mix: RMSNorm keeps fp32 copies even in a bf16 model, logsumexp is always fp32
    fp32 = sum(t.bytes_per_token for t in measured if t.dtype == "float32")
    assert fp32 == pytest.approx(sum(t.bytes_per_token for t in layer_inventory(
        LayerShape.from_hf_config(cfg, dtype)) if t.dtype == "float32"), rel=0.01)


def test_llama3_8b_bf16():
    """What plain transformers saves (the reference the runtime improves on)."""
    h, inter = 4096, 14336
    shape = LayerShape(hidden=h, intermediate=inter, num_heads=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")
    c = class_bytes_per_token(shape, runtime=False)
    total = sum(c[p] for p in PARTS)
    print(f"\nLlama-3-8B bf16 bytes/token/layer: {c} total={total:.0f} = {total / h:.2f}*h")
    kv = 8 * 128
    assert c["input"] == 4 * h  # fp32 upcast of the input, not 2h
    assert c["pre"] == 4 + 3 * 2 * h + 2 * 2 * kv  # rstd, normed, out, q + k, v (GQA: kv heads only)
    assert c["attn"] == 2 * h + 4 * 32  # out + fp32 logsumexp per head
    assert c["post"] == 4 * h + 4 + 2 * 2 * h + 4 * 2 * inter  # norm (fp32 x, rstd, normed, out) + 4 MLP tensors
    # Rules of thumb (MEMO ~16h, Korthikanti ~34h with flash) assume fused bf16 norms; transformers' RMSNorm keeps
    # 8h per norm and SwiGLU 28h, so ~49h. The band still catches a dropped or doubled tensor class.
    assert 10 * h < total < 60 * h
    assert c["attn"] / total < 0.15
    assert c["shared"] == 2 * 2 * 128  # cos + sin, once per model


def test_from_hf_config():
    s = LayerShape.from_hf_config(tiny("qwen3") | {"head_dim": None}, "bf16")
    assert (s.qk_norm, s.head_dim, s.dtype_bytes) == (True, 128, 2)  # Qwen3Config's head_dim default
    assert not LayerShape.from_hf_config(tiny("llama"), "float32").qk_norm
    with pytest.raises(ValueError):
        LayerShape.from_hf_config(tiny("llama") | {"model_type": "gpt2"}, "bfloat16")


def test_inventory_imports_no_torch():
    code = "import longtune.planner.inventory, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=cli_env())


def test_runtime_saves_less_than_plain_transformers_in_bf16():
    """The runtime keeps each norm's input once in bf16 (not its fp32 upcast), and the layer input as it is."""
    h, inter, kv = 4096, 14336, 8 * 128
    shape = LayerShape(hidden=h, intermediate=inter, num_heads=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")
    plain, runtime = class_bytes_per_token(shape, runtime=False), class_bytes_per_token(shape)
    assert runtime["input"] == 2 * h  # the input itself, bf16
    assert runtime["pre"] == plain["pre"] == 4 + 2 * 2 * h + 2 * (h + 2 * kv)  # the input norm's upcast is the input
    assert runtime["post"] == plain["post"] - 2 * h  # the residual kept in bf16, not its fp32 upcast
    total = lambda c: sum(c[p] for p in PARTS)  # noqa: E731
    assert total(plain) - total(runtime) == 4 * h
    # with the RMSNorm and SwiGLU kernels: no normed copies, three MLP tensors instead of four
    fused = class_bytes_per_token(shape, frozenset({"rmsnorm", "swiglu"}))
    assert runtime["post"] - fused["post"] == 2 * h + 2 * inter
    assert runtime["pre"] - fused["pre"] == 2 * h
