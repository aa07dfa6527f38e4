"""A decoder layer cut where the activation runtime needs it: pre-attention part, attention core, post part.

    y = post(x, attention(*pre(x)))

- pre(x):  input norm, q/k/v projections, q/k norms (Qwen3), RoPE -> q [b, nq, t, d], k and v [b, nkv, t, d]
- attention: causal attention inside each document (offload/attention.py), never in here
- post(x, a): o_proj, residual, post-attention norm, MLP, residual -> y [b, t, h]; `a` is the attention output
  as [b, t, nq * d]

Both token-wise parts run on any chunk of tokens, and call the layer's own modules (so a kernel that
`model.kernels` patched into a norm, the MLP or RoPE runs inside them). The formulas are transformers'
LlamaDecoderLayer / LlamaAttention (Mistral and Qwen2 are the same layer; Qwen3 adds the q/k norms), with the
attention interface and the mask left out: attention is the runtime's.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModel(ValueError):
    """The activation runtime cannot split this model's layers; the message says why and what is supported."""


def _rope(self, q, k, cos, sin, modeling):
    # `self` is the attention module on purpose: the kernels' RoPE dispatch (kernels/patch.py) asks its caller's
    # frame for `self` to know whether that module opted into the kernel.
    return modeling.apply_rotary_pos_emb(q, k, cos, sin)


@dataclass
class LayerSplit:
    layer: nn.Module
    modeling: object  # the transformers modeling module of the family, for its (maybe patched) RoPE
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float

    @property
    def attn(self) -> nn.Module:
        return self.layer.self_attn

    def pre(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        attn = self.attn
        h = self.layer.input_layernorm(x)
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = attn.q_proj(h).view(shape)
        k = attn.k_proj(h).view(shape)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over head_dim before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        q, k = _rope(attn, q, k, cos, sin, self.modeling)
        return q, k, v

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """k and v of `pre`, bit for bit, without the q projection (the attention backward needs the keys of all
        tokens; a recomputed chunk's q is made with its own backward)."""
        attn = self.attn
        h = self.layer.input_layernorm(x)
        shape = (*x.shape[:-1], -1, self.head_dim)
        k = attn.k_proj(h).view(shape)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        _, k = _rope(attn, k, k, cos, sin, self.modeling)  # RoPE takes q and k together; k stands in for q
        return k, v

    def post(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        r = x + self.attn.o_proj(attn_out)
        return r + self.layer.mlp(self.layer.post_attention_layernorm(r))


def check_supported(config, seq_len: int) -> None:
    """Raise UnsupportedModel, naming the reason, for a model the split would get wrong."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise UnsupportedModel(f"the activation runtime splits {', '.join(SUPPORTED)} decoder layers, not {model_type!r}")
    if getattr(config, "attention_dropout", 0.0):
        raise UnsupportedModel(f"attention_dropout={config.attention_dropout}: the activation runtime's attention has no dropout")
    window = _sliding_window(config)
    if window is not None and seq_len > window:
        raise UnsupportedModel(f"sliding-window attention ({window} tokens) at {seq_len} tokens is not supported by the "
                               f"activation runtime's attention; use data.seq_len <= {window}")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModel(f"hidden_act={act!r}: the split expects the gated SiLU MLP of {', '.join(SUPPORTED)}")


def _sliding_window(config):
    window = getattr(config, "sliding_window", None)
    if config.model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        return None
    return window


def split_layer(layer: nn.Module, config) -> LayerSplit:
    check_supported(config, 0)
    head_dim = layer.self_attn.head_dim
    modeling = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    return LayerSplit(layer, modeling, config.num_attention_heads, config.num_key_value_heads, head_dim,
                      float(layer.self_attn.scaling))
