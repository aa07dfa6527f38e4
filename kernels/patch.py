"""Put the kernels into a transformers Llama, Qwen2, Qwen3 or Mistral model, per model instance.

    apply_kernels(model, rmsnorm=True, rope=True, swiglu=True, fused_ce=True)

- RMSNorm and the gated MLP: each module's forward is replaced on the instance.
- RoPE: transformers' attention calls a module-level `apply_rotary_pos_emb`.
  Replacing it would change every model of the family in the process, so the
  replacement asks its caller, the attention module, whether its model opted in.
- Fused CE: with labels, the causal-LM forward runs the decoder, then the fused
  linear + cross-entropy on the shifted hidden states: the [tokens x vocab]
  logits are never built (the output carries no logits). Without labels, or
  with logits requested, the original forward runs.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Optional

import torch

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
_ROPE_FLAG = "_longtune_rope"


def _modeling(model_type: str):
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _rmsnorm_forward(self, hidden_states):
    from .rmsnorm import rms_norm

    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    from .swiglu import swiglu

    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _install_rope_dispatch(modeling) -> None:
    """Once per modeling module: a RoPE that uses the kernel for attention modules that opted in."""
    original = modeling.apply_rotary_pos_emb
    if getattr(original, "_longtune_dispatch", False):
        return

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        caller = sys._getframe(1).f_locals.get("self")
        if getattr(caller, _ROPE_FLAG, False):
            from .rope import apply_rope

            return apply_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb._longtune_dispatch = True
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


def _causal_lm_forward(original):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, num_items_in_batch=None, **kwargs):
        if past_key_values is not None:  # only passed when given: transformers 5.25 deprecates the name
            kwargs["past_key_values"] = past_key_values
        if labels is None or not isinstance(logits_to_keep, int) or logits_to_keep:
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                            logits_to_keep=logits_to_keep, num_items_in_batch=num_items_in_batch, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        from .fused_ce import fused_linear_cross_entropy

        shift_labels = kwargs.pop("shift_labels", None)  # targets shifted already (a sequence-parallel shard)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        if shift_labels is None:
            hidden, targets = out.last_hidden_state[:, :-1, :], labels[:, 1:]
        else:
            hidden, targets = out.last_hidden_state, shift_labels
        targets = targets.to(hidden.device)
        loss = fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets.reshape(-1), bias=self.lm_head.bias,
            num_items_in_batch=num_items_in_batch, chunk_size=self._longtune_ce_chunk,
        )
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    return forward


def apply_kernels(
    model: torch.nn.Module,
    rmsnorm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
    fused_ce: bool = True,
    ce_chunk_tokens: Optional[int] = None,
) -> dict[str, int]:
    """Patch `model` in place; returns how many modules each kernel replaced."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"kernels support {SUPPORTED}, not {model_type!r}")
    modeling = _modeling(model_type)
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[model_type]
    norm_cls, mlp_cls, attn_cls = (getattr(modeling, f"{prefix}{n}") for n in ("RMSNorm", "MLP", "Attention"))
    counts = {"rmsnorm": 0, "rope": 0, "swiglu": 0, "fused_ce": 0}
    for module in model.modules():
        if rmsnorm and isinstance(module, norm_cls):
            module.forward = types.MethodType(_rmsnorm_forward, module)
            counts["rmsnorm"] += 1
        elif swiglu and isinstance(module, mlp_cls):
            if getattr(module.config, "hidden_act", "silu") not in ("silu", "swish"):
                raise ValueError(f"swiglu kernel needs hidden_act silu, got {module.config.hidden_act!r}")
            module.forward = types.MethodType(_mlp_forward, module)
            counts["swiglu"] += 1
        elif rope and isinstance(module, attn_cls):
            setattr(module, _ROPE_FLAG, True)
            counts["rope"] += 1
    if rope:
        _install_rope_dispatch(modeling)
    if fused_ce:
        model._longtune_ce_chunk = ce_chunk_tokens
        model.forward = types.MethodType(_causal_lm_forward(model.forward), model)
        counts["fused_ce"] = 1
    return counts
