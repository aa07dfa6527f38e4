"""LoRA adapters (peft) injected into the transformers model in place, beside frozen base weights.

The model keeps its own class and module tree (peft's `inject_adapter_in_model`, not a PeftModel wrapper): each
targeted nn.Linear becomes a peft LoRA layer holding the frozen base layer, so the kernels, the activation
runtime's layer split (which calls `q_proj(x)` and the rest as modules), the strategies and the planner see the
model they know. Only the adapters require gradients, so the optimizers (which take the parameters that do)
step them alone; a checkpoint holds what trains (trainer/checkpoint.py), and the base is rebuilt from
`model.*` on resume. `longtune export` writes a peft adapter folder (`PeftModel.from_pretrained` loads it), or
the merged model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import AdapterConfig, ConfigError

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # what a PeftModel puts before the base model's own parameter names


def lora_config(a: AdapterConfig):
    from peft import LoraConfig

    return LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=list(a.target_modules),
                      bias="none", task_type="CAUSAL_LM")


def apply_adapter(model: torch.nn.Module, a: AdapterConfig) -> None:
    """LoRA layers into `model` in place, and every other parameter frozen; a no-op for adapter.kind=none."""
    if a.kind == "none":
        return
    from peft import inject_adapter_in_model

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = [t for t in a.target_modules if t not in linear]
    if missing:
        raise ConfigError(f"adapter.target_modules: {', '.join(missing)} not in the model; its linear layers are "
                          f"{', '.join(linear)}")
    dtype = next(p.dtype for p in model.parameters())
    inject_adapter_in_model(lora_config(a), model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
        if p.dtype != dtype:  # peft leaves a meta base's adapters in the default dtype (a dry run's model)
            p.data = p.data.to(dtype)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name: what an adapter checkpoint holds."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def export_adapter(model: torch.nn.Module, a: AdapterConfig, base: str, out_dir: Path) -> None:
    """A peft adapter folder: adapter_config.json and adapter_model.safetensors with a PeftModel's key names."""
    from safetensors.torch import save_file

    config = lora_config(a).to_dict()
    config["base_model_name_or_path"] = base
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    weights = {PEFT_PREFIX + name.replace(".default", ""): t.contiguous().cpu()
               for name, t in trainable_state(model).items()}
    save_file(weights, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=str))


def merge_adapter(model: torch.nn.Module) -> None:
    """Each LoRA layer's update folded into its base weight and the layer replaced by that base: a plain model."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    if getattr(getattr(model, "hf_quantizer", None), "quantization_config", None) is not None and \
            str(model.hf_quantizer.quantization_config.quant_method.value) == "gguf":
        # A base read from a GGUF file is de-quantized as it loads; transformers still marks it quantized and will not
        # save it: after the merge it is a plain model
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
