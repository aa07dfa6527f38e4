"""Model and tokenizer, built by transformers from a folder, a GGUF file or an inline config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from .config import ConfigError, ModelConfig
from .errors import CheckpointError
from .inputs import DEFAULT_TOKENIZER, config_overrides, resolve_source

def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_config(cfg: ModelConfig):
    """The transformers config the model is built from, without reading any weights."""
    from transformers import AutoConfig

    if cfg.config is not None:
        fields = {**cfg.config, **config_overrides(cfg)}
        try:
            return AutoConfig.for_model(fields.pop("model_type"), **fields)
        except Exception as e:  # noqa: BLE001 -- TypeError, ValueError, huggingface_hub's StrictDataclassError
            raise ConfigError(f"model.config: {_one_line(e)}") from None
    source = resolve_source(cfg.path, cfg.gguf_file)
    try:
        return AutoConfig.from_pretrained(source.folder, **source.kwargs(), **config_overrides(cfg))
    except Exception as e:  # noqa: BLE001 -- a missing, broken or invalid config.json / GGUF header
        raise ConfigError(f"model.path: cannot read the model's config from {source.folder}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    """A library's (maybe multi-line) message as one line: transformers' validators put the reason on line 2."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    # huggingface_hub's StrictDataclass wraps the reason: "Class validation error for validator 'x': ValueError: why"
    text = re.sub(r"^Class validation error for validator '\w+': \w+: ", "", text)
    return text or type(e).__name__


def build_model(cfg: ModelConfig, checkpoint: Optional[Path] = None, uninitialised: bool = False) -> torch.nn.Module:
    """A transformers causal LM in training mode.

    With `checkpoint` (a step_N folder), the architecture comes from its
    config.json and weights are left uninitialised: the checkpoint overwrites
    every one, and neither a GGUF parse nor a random init is paid for.
    `uninitialised`: the same without a checkpoint (a dry run's model on the meta device).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    common = {"dtype": torch_dtype(cfg.dtype), "attn_implementation": cfg.attn_implementation}
    if checkpoint is not None or uninitialised:
        saved = checkpoint is not None and (Path(checkpoint) / "config.json").is_file()
        try:
            config = AutoConfig.from_pretrained(checkpoint) if saved else build_config(cfg)
        except (OSError, ValueError) as e:  # transformers reports a broken config.json as either
            raise CheckpointError(f"checkpoint {checkpoint} is unreadable: config.json: {_one_line(e)}") from None
        with _no_init_weights():
            model = AutoModelForCausalLM.from_config(config, **common)
        model.tie_weights()  # skipped with the init
    elif cfg.path is not None:
        source = resolve_source(cfg.path, cfg.gguf_file)
        try:
            model = AutoModelForCausalLM.from_pretrained(source.folder, **source.kwargs(), **common, **config_overrides(cfg))
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 -- a truncated or mismatched weights file, a broken config.json
            raise ConfigError(f"model.path: cannot load the model from {cfg.path}: {_one_line(e)}") from None
    else:
        model = AutoModelForCausalLM.from_config(build_config(cfg), **common)
    # With a KV cache, transformers skips the per-document mask it builds from
    # position_ids, and packed documents would attend to each other.
    model.config.use_cache = False
    model.train()
    return model


def patch_model(model: torch.nn.Module, cfg) -> None:
    """model.kernels patched in, and gradient checkpointing on where memory.gradient_checkpointing says (a run
    and a dry run prepare the model alike)."""
    kernels = cfg.model.kernels
    if kernels.rmsnorm or kernels.rope or kernels.swiglu or kernels.fused_ce:
        from longtune.models.patch import apply_kernels

        apply_kernels(model, kernels.rmsnorm, kernels.rope, kernels.swiglu, kernels.fused_ce, kernels.ce_chunk_tokens)
    if cfg.memory.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()  # transformers 5 renamed gradient_checkpointing_enable


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def build_tokenizer(cfg: ModelConfig, saved: Optional[Path] = None):
    """The tokenizer of `cfg`, or the copy a run saved in `saved` (fast: no GGUF parse)."""
    from transformers import AutoTokenizer

    if saved is not None and (Path(saved) / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(saved)
        except Exception as e:  # noqa: BLE001 -- a damaged tokenizer.json surfaces as JSON, OS or value errors
            raise CheckpointError(f"the run's tokenizer {saved} is unreadable: {_one_line(e)}") from None
    spec = cfg.tokenizer or cfg.path or DEFAULT_TOKENIZER
    source = resolve_source(spec, cfg.gguf_file if spec == cfg.path else None, what="model.tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **source.kwargs())
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"model.tokenizer: cannot load a tokenizer from {spec}: {_one_line(e)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    # Tied weights (embedding = lm_head) count once; a 4-bit weight (adapter.kind=qlora) as the weights it packs.
    return sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
               for p in {id(p): p for p in model.parameters()}.values())
