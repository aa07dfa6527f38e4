"""Put longtune's kernels into a transformers model of a supported family, per model instance.

    apply_kernels(model, rmsnorm=True, rope=True, swiglu=True, fused_ce=True)

- RMSNorm and the gated MLP: each module's forward is replaced on the instance.
- RoPE: transformers' attention calls a module-level `apply_rotary_pos_emb`; replacing it outright would change
  every model of the family in the process. Each opted-in attention module carries the kernel (`rope_of` reads
  it: the activation runtime's layer split calls it directly), and its forward is wrapped to name itself in a
  context variable that the module-level dispatcher reads, so stock attention code reaches the kernel too.
- Fused CE: with labels, the causal-LM forward runs the decoder, then the fused linear + cross-entropy on the
  shifted hidden states: the [tokens x vocab] logits are never built (the output carries no logits). Without
  labels, or with logits requested, the original forward runs.

Which kernels compute a family's modules exactly is the family's entry (families.py).
"""

from __future__ import annotations

import contextvars
import importlib
import types
from typing import Callable, Optional

import torch

from .families import SUPPORTED, UnsupportedModel, activation_error, family, kernel_error

_ROPE_ATTR = "_longtune_rope"  # on an attention module: the RoPE function it uses instead of the stock one
# The attention module whose forward is running (in this thread / context), for the module-level dispatcher.
_RUNNING_ATTENTION: contextvars.ContextVar = contextvars.ContextVar("longtune_running_attention", default=None)


def modeling_module(model_type: str):
    """transformers' modeling module of a family (its classes and module-level RoPE)."""
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def rope_of(attention: torch.nn.Module, modeling) -> Callable:
    """The RoPE function `attention` uses: the kernel if it opted in, else the family's stock one."""
    stock = modeling.apply_rotary_pos_emb
    return getattr(attention, _ROPE_ATTR, None) or getattr(stock, "stock", stock)


def _rmsnorm_forward(self, hidden_states):
    from longtune.kernels.rmsnorm import rms_norm

    # Llama-style norms name their epsilon variance_epsilon, Gemma's eps; the offset is the family's (families.py)
    eps = getattr(self, "variance_epsilon", None)
    return rms_norm(hidden_states, self.weight, self.eps if eps is None else eps, self._longtune_norm_offset)


def _mlp_forward(self, x):
    from longtune.kernels.swiglu import swiglu

    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _install_rope_dispatch(modeling) -> None:
    """Once per modeling module: a RoPE that runs the RoPE of the attention module whose forward is running."""
    stock = modeling.apply_rotary_pos_emb
    if hasattr(stock, "stock"):
        return

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        rope = getattr(_RUNNING_ATTENTION.get(), _ROPE_ATTR, None)
        if rope is not None:
            return rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return stock(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.stock = stock
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


def _use_rope_kernel(attention: torch.nn.Module) -> None:
    """The attention module runs the RoPE kernel: stored on it, and its forward names it while it runs."""
    from longtune.kernels.rope import apply_rope

    if getattr(attention, _ROPE_ATTR, None) is not None:
        return
    setattr(attention, _ROPE_ATTR, apply_rope)
    forward = attention.forward

    def named_forward(*args, **kwargs):
        token = _RUNNING_ATTENTION.set(attention)
        try:
            return forward(*args, **kwargs)
        finally:
            _RUNNING_ATTENTION.reset(token)

    attention.forward = named_forward


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

        from longtune.kernels.fused_ce import fused_linear_cross_entropy

        shift_labels = kwargs.pop("shift_labels", None)  # targets shifted already (a sequence-parallel shard)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        # Every position's hidden state, the last one's target ignored (not the states sliced [:, :-1]: the slice's
        # backward would make a new zero-filled gradient of them all)
        hidden = out.last_hidden_state
        if shift_labels is None:
            targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        else:
            targets = shift_labels
        targets = targets.to(hidden.device)
        # The final norm's output is used by the loss alone (unless the caller asked for every hidden state): its
        # gradient is written over it, one [tokens, hidden] buffer fewer at the head (planner/problem.head_bytes)
        loss = fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets.reshape(-1), bias=self.lm_head.bias,
            num_items_in_batch=num_items_in_batch, chunk_size=self._longtune_ce_chunk,
            overwrite_hidden=out.hidden_states is None,
        )
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    return forward


def loss_writes_over_hidden(model: torch.nn.Module) -> bool:
    """Whether the model's loss is the fused one of `_causal_lm_forward`, which writes the final hidden states'
    gradient over them."""
    return hasattr(model, "_longtune_ce_chunk")


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
        raise UnsupportedModel(f"kernels support {', '.join(SUPPORTED)} models, not {model_type!r}")
    f = family(model_type)
    asked = {k for k, on in (("rmsnorm", rmsnorm), ("rope", rope), ("swiglu", swiglu), ("fused_ce", fused_ce)) if on}
    reason = kernel_error(model_type, asked)
    if reason:
        raise UnsupportedModel(reason)
    if swiglu and activation_error(model.config):
        raise UnsupportedModel(f"swiglu kernel: {activation_error(model.config)}")
    modeling = modeling_module(model_type)
    norm_cls, mlp_cls, attn_cls = (getattr(modeling, f"{f.prefix}{n}") for n in ("RMSNorm", "MLP", "Attention"))
    counts = {"rmsnorm": 0, "rope": 0, "swiglu": 0, "fused_ce": 0}
    for module in model.modules():
        if rmsnorm and isinstance(module, norm_cls):
            module._longtune_norm_offset = f.norm_offset
            module.forward = types.MethodType(_rmsnorm_forward, module)
            counts["rmsnorm"] += 1
        elif swiglu and isinstance(module, mlp_cls):
            module.forward = types.MethodType(_mlp_forward, module)
            counts["swiglu"] += 1
        elif rope and isinstance(module, attn_cls):
            _use_rope_kernel(module)
            counts["rope"] += 1
    if rope:
        _install_rope_dispatch(modeling)
    if fused_ce:
        model._longtune_ce_chunk = ce_chunk_tokens
        model.forward = types.MethodType(_causal_lm_forward(model.forward), model)
        counts["fused_ce"] = 1
    return counts
