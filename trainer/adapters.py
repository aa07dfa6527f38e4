"""LoRA adapters (peft) injected into the transformers model in place, beside frozen base weights.

The model keeps its own class and module tree (peft's `inject_adapter_in_model`, not a PeftModel wrapper): each
targeted nn.Linear becomes a peft LoRA layer holding the frozen base layer, so the kernels, the activation
runtime's layer split (which calls `q_proj(x)` and the rest as modules), the strategies and the planner see the
model they know. Only the adapters require gradients, so the optimizers (which take the parameters that do)
step them alone; a checkpoint holds what trains (trainer/checkpoint.py), and the base is rebuilt from
`model.*` on resume. `longtune export` writes a peft adapter folder (`PeftModel.from_pretrained` loads it), or
the merged model.

QLoRA (adapter.kind=qlora) first replaces every nn.Linear of the decoder layers by a bitsandbytes Linear4bit holding
the same weight quantized to 4-bit NF4 (`quantize_base`; the model is built as for LoRA, from any source longtune
reads, and quantized here rather than by transformers' BitsAndBytesConfig loader, which neither reads GGUF files nor
builds inline configs), then injects the adapters over them (peft's bnb LoRA layers). The merge de-quantizes the
base first: the merged model is the NF4 base's weights, de-quantized to model.dtype, plus the adapters' update.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .config import AdapterConfig, ConfigError

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # what a PeftModel puts before the base model's own parameter names


def lora_config(a: AdapterConfig, tied: bool = False):
    """peft's LoraConfig for these settings; `tied` (the model ties its LM head to its embeddings): a saved embedding or
    head stays tied (one trained copy, peft's ensure_weight_tying), as the model was."""
    from peft import LoraConfig

    return LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=list(a.target_modules),
                      bias="none", task_type="CAUSAL_LM", modules_to_save=list(a.modules_to_save) or None,
                      ensure_weight_tying=bool(a.modules_to_save) and tied)


def ties_embeddings(model: torch.nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def _check_modules_to_save(model: torch.nn.Module, a: AdapterConfig) -> None:
    """adapter.modules_to_save, matched as peft matches them (a module whose name ends with the given one; only modules
    with weights count): a one-line ConfigError for a name that matches nothing, a module that is or holds a LoRA
    target or (qlora) a projection kept in 4 bits, or one module inside another."""
    if not a.modules_to_save:
        return
    from longtune.models.layers import UnsupportedModel, decoder_layers

    weighted = {key: m for key, m in model.named_modules() if key and next(m.parameters(), None) is not None}
    four_bit = set()
    if a.kind == "qlora":  # the nn.Linear layers quantize_base replaces: those of the decoder layers
        try:
            layers = {id(layer) for layer in decoder_layers(model)}
        except UnsupportedModel:
            layers = set()  # quantize_base says why
        within = [f"{key}." for key, m in weighted.items() if id(m) in layers]
        four_bit = {f"{key}." for key, m in weighted.items()
                    if type(m) is torch.nn.Linear and any(key.startswith(layer) for layer in within)}
    targets = {f"{key}." for key, m in weighted.items()
               if type(m) is torch.nn.Linear and key.rsplit(".", 1)[-1] in a.target_modules}
    leaves = {key for key, m in weighted.items() if next(m.parameters(recurse=False), None) is not None}
    candidates = sorted({k.rsplit(".", 1)[-1] for k in leaves if f"{k}." not in targets | four_bit})
    chosen: dict[str, str] = {}
    for name in a.modules_to_save:
        matched = [key for key in weighted if key.endswith(name)]
        if not matched:
            raise ConfigError(f"adapter.modules_to_save: {name} matches no module of the model with weights; the modules "
                              f"that can train in full: {', '.join(candidates)}")
        for key in matched:
            for kind, held in (("a LoRA target (adapter.target_modules): a module trains through its adapter or in "
                                "full, not both", targets),
                               ("a projection adapter.kind=qlora keeps in 4 bits, frozen: use adapter.kind=lora to train "
                                "it in full", four_bit)):
                if any(t.startswith(f"{key}.") for t in held):
                    raise ConfigError(f"adapter.modules_to_save: {name} names {key}, which is or holds {kind}")
            other = next((k for k in chosen if k != key and (k.startswith(f"{key}.") or key.startswith(f"{k}."))), None)
            if other is not None:
                raise ConfigError(f"adapter.modules_to_save: {name} names {key} and {chosen[other]} names {other}, one "
                                  "inside the other: name one of them")
            chosen[key] = name


def apply_adapter(model: torch.nn.Module, a: AdapterConfig) -> None:
    """LoRA layers into `model` in place (over a 4-bit base for qlora), and every other parameter frozen; a no-op for
    adapter.kind=none."""
    if a.kind == "none":
        return
    from peft import inject_adapter_in_model

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = [t for t in a.target_modules if t not in linear]
    if missing:
        raise ConfigError(f"adapter.target_modules: {', '.join(missing)} not in the model; its linear layers are "
                          f"{', '.join(linear)}")
    _check_modules_to_save(model, a)
    dtype = next(p.dtype for p in model.parameters())
    if a.kind == "qlora":
        quantize_base(model, a)
    inject_adapter_in_model(lora_config(a, ties_embeddings(model)), model)
    for name, p in model.named_parameters():  # the adapters, and the trained copies of modules_to_save (peft's names)
        p.requires_grad_(".lora_" in name or ".modules_to_save." in name)
        if p.requires_grad and p.dtype != dtype:  # peft leaves a meta base's adapters in the default dtype (a dry run's)
            p.data = p.data.to(dtype)


def import_bitsandbytes():
    """bitsandbytes, or a one-line ConfigError (not installed, or its native library does not load). Its import asks
    the network for nothing: see trainer/__init__.py."""
    try:
        import bitsandbytes
    except Exception as e:  # noqa: BLE001 -- ImportError, or a broken install's OSError / RuntimeError
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"adapter.kind=qlora keeps the base weights in 4 bits through bitsandbytes, which does not "
                          f"import here ({reason}): pip install bitsandbytes, or adapter.kind=lora") from None
    return bitsandbytes


def compute_dtype(a: AdapterConfig, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a 4-bit layer's matmuls run in: adapter.compute_dtype, `auto` the model's."""
    return model_dtype if a.compute_dtype == "auto" else getattr(torch, a.compute_dtype)


def quantize_base(model: torch.nn.Module, a: AdapterConfig) -> int:
    """Every nn.Linear of the decoder layers replaced, in place, by a frozen bitsandbytes Linear4bit holding its weight
    in NF4 (absmax per 64 weights, itself 8-bit with adapter.double_quant) and running its matmuls in
    `compute_dtype(a, ...)`; returns how many. Quantized where the weights are (the host, before the runtime places
    the model). The model is marked `is_loaded_in_4bit`, as transformers' loader marks it, so that peft wraps these
    layers in its bnb LoRA layers."""
    from longtune.models.layers import UnsupportedModel, decoder_layers

    bnb = import_bitsandbytes()
    try:
        layers = decoder_layers(model)
    except UnsupportedModel as e:
        raise ConfigError(f"adapter.kind=qlora: {e}") from None
    count = 0
    for i, layer in enumerate(layers):
        found = [(name, m) for name, m in layer.named_modules() if type(m) is torch.nn.Linear]
        if not found:
            kinds = sorted({type(m).__name__ for name, m in layer.named_modules() if name and not list(m.children())})
            raise ConfigError(f"adapter.kind=qlora quantizes the nn.Linear layers of the decoder layers, and decoder "
                              f"layer {i} ({type(layer).__name__}) has none (its layers: {', '.join(kinds)}); use "
                              "adapter.kind=lora")
        for name, m in found:
            if m.weight.is_meta:
                raise ConfigError("adapter.kind=qlora: a model without weights (a dry run's, on the meta device) cannot "
                                  "be quantized; `longtune plan` without --dry-run counts the 4-bit base")
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                  compute_dtype=compute_dtype(a, m.weight.dtype), compress_statistics=a.double_quant,
                                  quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(m.weight.data, requires_grad=False, compress_statistics=a.double_quant,
                                         quant_type="nf4", module=q).to(m.weight.device)  # .to quantizes
            if m.bias is not None:
                q.bias = torch.nn.Parameter(m.bias.data, requires_grad=False)
            # bitsandbytes repacks a layer's weight in place for its bf16 CPU inference kernel the first time it runs
            # in eval mode without gradients (a passkey evaluation), and runs that layer in bf16, without a
            # backward, from then on: keep its one training path
            q.support_avx512bf16_for_cpu = False
            q.train(m.training)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, q)
            count += 1
    model.is_loaded_in_4bit = True
    return count


def _dequantized(layer: torch.nn.Module, dtype: torch.dtype, delta=None) -> torch.nn.Linear:
    """A bitsandbytes Linear4bit as a plain nn.Linear in `dtype`: its NF4 weight de-quantized (plus `delta`, summed
    in fp32)."""
    import bitsandbytes.functional as F

    weight = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    if delta is not None:
        weight = weight + delta.float()
    plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    if layer.bias is not None:
        plain.bias = torch.nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
    return plain


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name: what an adapter checkpoint holds."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def export_adapter(model: torch.nn.Module, a: AdapterConfig, base: str, out_dir: Path) -> None:
    """A peft adapter folder: adapter_config.json and adapter_model.safetensors with a PeftModel's key names."""
    from safetensors.torch import save_file

    from peft import get_peft_model_state_dict

    config = lora_config(a, ties_embeddings(model)).to_dict()
    config["base_model_name_or_path"] = base
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    # peft's own names (the adapter's name taken out; a saved module's trained copy under the module's name), and a
    # tied head's copy beside the embeddings' as PeftModel.save_pretrained writes it (cloned: safetensors holds no
    # shared storage)
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    weights, seen = {}, set()
    for name, t in state.items():
        key = (t.data_ptr(), t.shape)
        weights[PEFT_PREFIX + name] = (t.clone() if key in seen else t).contiguous().cpu()
        seen.add(key)
    save_file(weights, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=str))


def merge_adapter(model: torch.nn.Module) -> None:
    """Each LoRA layer's update folded into its base weight and the layer replaced by that base, and each saved module
    (modules_to_save) replaced by its trained copy: a plain model. A 4-bit
    base (qlora) is de-quantized to the model's dtype first (every Linear4bit, a target or not), and the update added
    to that: the merged weights are the NF4 base's values plus the update, not the weights it was quantized from."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    bnb = sys.modules.get("bitsandbytes")
    four_bit = (bnb.nn.Linear4bit,) if bnb is not None else ()
    dtype = model.get_input_embeddings().weight.dtype
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if isinstance(module, ModulesToSaveWrapper):  # its trained copy in its place (peft's unload)
            setattr(model.get_submodule(parent_name), child,
                    module.unload_and_optionally_merge_module(merge=False, safe_merge=False, adapter_names=None))
        elif isinstance(module, LoraLayer):
            base = module.get_base_layer()
            if four_bit and isinstance(base, four_bit):
                merged = _dequantized(base, dtype, module.get_delta_weight(module.active_adapters[0]))
            else:
                module.merge()
                merged = base
            setattr(model.get_submodule(parent_name), child, merged)
    for name, module in list(model.named_modules()):
        if four_bit and isinstance(module, four_bit):  # a 4-bit layer no adapter targets
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, _dequantized(module, dtype))
    if getattr(model, "is_loaded_in_4bit", False):
        del model.is_loaded_in_4bit
    if getattr(getattr(model, "hf_quantizer", None), "quantization_config", None) is not None and \
            str(model.hf_quantizer.quantization_config.quant_method.value) == "gguf":
        # A base read from a GGUF file is de-quantized as it loads; transformers still marks it quantized and will not
        # save it: after the merge it is a plain model
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
