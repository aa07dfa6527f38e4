"""The model families longtune trains, and what sets each apart. No torch, no transformers: the config checks,
the planner's activation inventory and `longtune plan` read this table before (or without) importing torch.

Every family here is transformers' Llama decoder layer with small variations:

    y = r + mlp(post_attention_layernorm(r)),  r = x + o_proj(attention(rope(q, k), v)),
    q, k, v = q/k/v_proj(input_layernorm(x))    (mlp: down(act(gate(h)) * up(h)))

A new family that fits this shape is one `Family(...)` line in FAMILIES; one that does not (fused q/k/v, extra
norms, soft-capping) needs the layer split (`layers.py`) and the planner's inventory taught its difference first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

KERNELS = ("rmsnorm", "rope", "swiglu", "fused_ce")


class UnsupportedModel(ValueError):
    """longtune cannot train this model (family, activation, attention variant); the message says why."""


@dataclass(frozen=True)
class Family:
    model_type: str  # transformers' config.model_type
    prefix: str  # transformers' class prefix: f"{prefix}RMSNorm", f"{prefix}MLP", f"{prefix}Attention"
    activations: tuple[str, ...] = ("silu", "swish")  # hidden_act values of the gated MLP
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    # Gemma's norm: x * (offset + w), multiplied in fp32 and cast after, where Llama's is w * x.to(dtype); it keeps
    # its normalised values in fp32 for backward (the planner counts 4 bytes per element, not the dtype's), and the
    # rmsnorm kernel computes it with this offset.
    norm_offset: float = 0.0
    default_head_dim: Optional[int] = None  # head_dim when the config leaves it out (else hidden // heads)
    sliding_window_flag: Optional[str] = None  # config flag that must be true for `sliding_window` to apply
    # Kernels that compute this family's modules exactly (Gemma's GELU MLP is not the swiglu kernel's formula).
    kernels: tuple[str, ...] = KERNELS


FAMILIES = {f.model_type: f for f in (
    Family("llama", "Llama"),
    Family("mistral", "Mistral"),
    Family("qwen2", "Qwen2", sliding_window_flag="use_sliding_window"),
    Family("qwen3", "Qwen3", qk_norm=True, default_head_dim=128, sliding_window_flag="use_sliding_window"),
    Family("gemma", "Gemma", activations=("gelu_pytorch_tanh", "gelu"), norm_offset=1.0,
           default_head_dim=256, kernels=("rmsnorm", "rope", "fused_ce")),
)}
SUPPORTED = tuple(FAMILIES)


def _get(config, key: str):
    """A field of a transformers config object or of its dict."""
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def family(model_type: Optional[str], what: str = "model_type") -> Family:
    """The family of `model_type`, or UnsupportedModel naming the ones longtune trains."""
    if model_type not in FAMILIES:
        raise UnsupportedModel(f"{what}: got {model_type!r}; longtune trains {', '.join(SUPPORTED)} models")
    return FAMILIES[model_type]


def head_dim(config) -> int:
    """The attention head size of a transformers config (object or dict), with the family's default when absent."""
    f = FAMILIES.get(_get(config, "model_type"))
    return (_get(config, "head_dim") or (f and f.default_head_dim)
            or _get(config, "hidden_size") // _get(config, "num_attention_heads"))


def sliding_window(config) -> Optional[int]:
    """The sliding window the model's attention uses, or None (Qwen2/3 set one that applies only with a flag)."""
    f = FAMILIES.get(_get(config, "model_type"))
    if f is not None and f.sliding_window_flag and not _get(config, f.sliding_window_flag):
        return None
    return _get(config, "sliding_window") or None


def kernel_error(model_type: str, asked) -> Optional[str]:
    """Why one of the kernels `asked` (names of KERNELS) does not compute this family exactly, or None."""
    f = family(model_type)
    for k in KERNELS:
        if k in asked and k not in f.kernels:
            return (f"model.kernels.{k}: the {k} kernel does not compute {model_type}'s layers exactly; "
                    f"{model_type} takes {', '.join(f.kernels) or 'none'}")
    return None


def activation_error(config) -> Optional[str]:
    """Why the model's MLP activation is not the family's gated one, or None."""
    f = family(_get(config, "model_type"))
    act = _get(config, "hidden_act") or f.activations[0]
    if act not in f.activations:
        return f"hidden_act={act!r}: longtune's {f.model_type} layer is the gated MLP with {' or '.join(f.activations)}"
    return None
