"""The decoder layers of a model, and one layer cut where the activation runtime needs it.

    layers = decoder_layers(model)
    y = post(x, attention(*pre(x)))

- pre(x):  input norm, q/k/v projections, q/k norms (Qwen3), RoPE -> q [b, nq, t, d], k and v [b, nkv, t, d]
- attention: causal attention inside each document (offload/attention.py), never in here
- post(x, a): o_proj, residual, post-attention norm, MLP, residual -> y [b, t, h]; `a` is the attention output
  as [b, t, nq * d]

Both token-wise parts run on any chunk of tokens, and call the layer's own modules (so a kernel that
`model.kernels` patched into a norm or the MLP runs inside them; RoPE is the one `patch.rope_of` names for the
attention module). The formulas are transformers' LlamaDecoderLayer / LlamaAttention, which every family in
`families.FAMILIES` shares (Qwen3 adds the q/k norms; Gemma's norm and MLP differ inside their modules), with the
attention interface and the mask left out: attention is the runtime's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .families import SUPPORTED, UnsupportedModel, activation_error, family, sliding_window
from .patch import modeling_module, rope_of

__all__ = ["SUPPORTED", "UnsupportedModel", "LayerSplit", "check_supported", "decoder", "decoder_layers", "split_layer"]


def decoder(model: nn.Module) -> nn.Module:
    """The decoder under a causal LM's head (model.model: embeddings, layers, final norm, rotary embedding), found
    through transformers' `base_model`, so a LoRA-injected or FSDP-sharded model is found alike."""
    base = getattr(model, "base_model", None)
    if base is None or not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise UnsupportedModel(f"{type(model).__name__}: cannot find the decoder layers (expected model.model.layers, "
                               f"as in transformers' {', '.join(SUPPORTED)} models)")
    return base


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers of a transformers causal LM (model.model.layers)."""
    return decoder(model).layers


@dataclass
class LayerSplit:
    layer: nn.Module
    modeling: object  # the transformers modeling module of the family, for its stock RoPE
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float

    @property
    def attn(self) -> nn.Module:
        return self.layer.self_attn

    def _rope(self, q, k, cos, sin):
        return rope_of(self.attn, self.modeling)(q, k, cos, sin)

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
        q, k = self._rope(q, k, cos, sin)
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
        _, k = self._rope(k, k, cos, sin)  # RoPE takes q and k together; k stands in for q
        return k, v

    def post(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        r = x + self.attn.o_proj(attn_out)
        return r + self.layer.mlp(self.layer.post_attention_layernorm(r))


def check_supported(config, seq_len: int) -> None:
    """Raise UnsupportedModel, naming the reason, for a model the split would get wrong."""
    family(getattr(config, "model_type", None), "the activation runtime: model_type")
    if getattr(config, "attention_dropout", 0.0):
        raise UnsupportedModel(f"attention_dropout={config.attention_dropout}: the activation runtime's attention has no dropout")
    window = sliding_window(config)
    if window is not None and seq_len > window:
        raise UnsupportedModel(f"sliding-window attention ({window} tokens) at {seq_len} tokens is not supported by the "
                               f"activation runtime's attention; use data.seq_len <= {window}")
    reason = activation_error(config)
    if reason:
        raise UnsupportedModel(reason)


def split_layer(layer: nn.Module, config) -> LayerSplit:
    check_supported(config, 0)
    return LayerSplit(layer, modeling_module(config.model_type), config.num_attention_heads,
                      config.num_key_value_heads, layer.self_attn.head_dim, float(layer.self_attn.scaling))
