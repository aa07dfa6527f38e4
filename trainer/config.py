"""The run configuration: typed pydantic models, YAML in, dotted overrides on top.

    cfg = load_config("configs/quickstart.yaml", ["train.max_steps=12", "train.lr=1e-4"])

Every mistake a user can make in a config surfaces as one `ConfigError` whose
message names the key path, what was given and what was expected.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from longtune.planner.problem import LAYER_MATRIX_NAMES  # the projections of a decoder layer: LoRA's default targets

from .errors import ConfigError  # noqa: F401  (re-exported: the config's error)



class _Section(BaseModel):
    # Overrides arrive typed by YAML; `run.output_dir=2024` still means a string.
    # allow_inf_nan=False: `memory.budget_gb=.nan` or `.inf` is a config error, not a number the solver chokes on
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), coerce_numbers_to_str=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info):
        """`train.max_steps=true` is a mistake, not 1: a number field takes no boolean (pydantic would)."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and _numeric(annotation):
            raise ValueError(f"got {str(value).lower()}; expected a number, not a boolean")
        if annotation in (bool, Optional[bool]) and value is not None and not isinstance(value, bool):
            raise ValueError(f"got {value!r}; expected true or false")
        return value


def _numeric(annotation) -> bool:
    """int or float, also inside Optional / Union / tuple (not bool, not str)."""
    if annotation in (int, float):
        return True
    return any(_numeric(a) for a in getattr(annotation, "__args__", ()) if a is not type(None))


class KernelsConfig(_Section):
    """Fused kernels (Triton on a GPU or under TRITON_INTERPRET=1, torch references elsewhere)."""

    rmsnorm: bool = False
    rope: bool = False
    swiglu: bool = False
    fused_ce: bool = False  # the loss without full [tokens x vocab] logits
    ce_chunk_tokens: Optional[int] = Field(None, gt=0)  # tokens per fused-CE chunk; null: the kernel's default


class ModelConfig(_Section):
    # A local transformers folder, a .gguf file, or `pkg://module/file` for a file
    # shipped inside an installed Python package (the bundled SmolLM2 GGUF).
    path: Optional[str] = None
    gguf_file: Optional[str] = None  # file name inside `path` when `path` is a folder
    # Inline transformers config for random init; needs `model_type` (llama, qwen2, qwen3, mistral).
    config: Optional[dict[str, Any]] = None
    # Tokenizer source when it is not the model's own (e.g. for an inline config).
    tokenizer: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    kernels: KernelsConfig = KernelsConfig()
    # Overrides of the model's own config: RoPE scaling ({rope_type: linear|dynamic|yarn|..., factor: 4}) and the
    # positions it is trained for. data.seq_len above max_position_embeddings needs one of the two.
    rope_scaling: Optional[dict[str, Any]] = None
    max_position_embeddings: Optional[int] = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.path is None) == (self.config is None):
            raise ValueError("set exactly one of model.path (folder, .gguf, pkg://) and model.config (inline)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a model_type (llama, qwen2, qwen3, mistral)")
        return self


class PasskeyConfig(_Section):
    digits: int = Field(5, ge=1, le=20)
    eval_samples: int = Field(8, ge=0)


class ChatConfig(_Section):
    """data.kind=chat: conversations rendered with the tokenizer's chat template, the loss on the assistant's turns."""

    # The file kind of data.path: auto finds it (.jsonl/.json, .parquet, or a datasets save_to_disk folder).
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = "auto"
    messages_field: str = "messages"  # a list of {role, content}; role: system, user, assistant or tool
    prompt_field: str = "prompt"  # or a prompt/completion pair: the loss on the completion
    completion_field: str = "completion"
    # A conversation longer than data.seq_len: error (the default: say how many, and which first), truncate to its
    # first seq_len tokens, or drop it. Never silent: truncated and dropped counts are printed once.
    too_long: Literal["error", "truncate", "drop"] = "error"

    @model_validator(mode="after")
    def _distinct_fields(self) -> "ChatConfig":
        names = (self.messages_field, self.prompt_field, self.completion_field)
        if len(set(names)) < 3:
            raise ValueError(f"messages_field, prompt_field and completion_field must differ, got {list(names)}")
        return self


class DataConfig(_Section):
    kind: Literal["passkey", "jsonl", "text", "parquet", "hf_disk", "chat"] = "passkey"
    path: Optional[str] = None  # a file, a folder of files, or a `datasets` save_to_disk folder
    text_field: str = "text"
    seq_len: int = Field(1024, gt=0)
    packing: bool = True  # False: one document (conversation) per sequence, truncated and padded
    passkey: PasskeyConfig = PasskeyConfig()
    chat: ChatConfig = ChatConfig()

    @model_validator(mode="after")
    def _path_for_files(self) -> "DataConfig":
        if self.kind != "passkey" and not self.path:
            raise ValueError(f"data.kind={self.kind} needs data.path")
        if self.kind != "chat" and self.chat != ChatConfig():
            raise ValueError(f"data.chat is set but data.kind={self.kind}: set data.kind=chat to use it, or drop it")
        if self.kind == "chat" and self.text_field != "text":
            raise ValueError("data.text_field names a document's text; chat records are read from "
                             "data.chat.messages_field (or data.chat.prompt_field and data.chat.completion_field)")
        return self


class TrainConfig(_Section):
    max_steps: int = Field(100, gt=0)
    micro_batch_size: int = Field(1, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    clip_grad_norm: Optional[float] = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16"] = "no"  # bf16 = autocast over fp32 weights
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's seeds are 32-bit
    eval_every_n_steps: int = Field(0, ge=0)  # 0: evaluate once, at the end


class GaloreConfig(_Section):
    """optim.name=galore_adamw: each target weight's gradient projected to rank `rank` (offload/galore.py)."""

    rank: int = Field(128, gt=0)
    update_proj_gap: int = Field(200, gt=0)  # steps between refreshes of a weight's basis
    scale: float = Field(0.25, gt=0)
    targets: list[str] = ["*.self_attn.*_proj.weight", "*.mlp.*_proj.weight"]  # parameter-name patterns
    projector: Literal["svd", "randomized", "random"] = "svd"
    on_refresh: Literal["keep", "rotate"] = "keep"  # what the moments do when the basis changes
    stagger: bool = True  # spread the weights' refreshes over the gap instead of all in one step
    layerwise: bool = False  # each weight steps in its gradient hook during backward
    eight_bit: bool = False  # moments of 4096+ elements blockwise-quantised to 8 bits (needs bitsandbytes)
    seed: int = Field(0, ge=0, lt=2**32)  # the random projector's (and the randomized one's start)


class OptimConfig(_Section):
    name: Literal["adamw", "galore_adamw"] = "adamw"
    galore: GaloreConfig = GaloreConfig()
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value):
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"got {list(value)}; each beta must be in [0, 1)")
        return value


class TiersConfig(_Section):
    """What longtune may use of each tier off the GPU, in GB; null: what this machine has free now."""

    host_gb: Optional[float] = Field(None, ge=0)  # local DRAM
    cxl_gb: Optional[float] = Field(None, ge=0)  # CPU-less NUMA nodes
    nvme_gb: Optional[float] = Field(None, ge=0)  # free space under memory.nvme_path


class MemoryConfig(_Section):
    """What the planner spends (`longtune plan`) and where optimizer state and weights live."""

    # GPU memory the plan spends on activations, state and workspace; set, it turns the activation runtime on.
    # null: activations stay with autograd (the plan only places state); auto: the free device memory less 5%.
    budget_gb: Optional[Union[Literal["auto"], float]] = None
    gradient_checkpointing: bool = False
    plan: str = "auto"  # auto: solve for this config | a plan.yaml to use as it is
    machine: str = "h100-pcie5"  # machine profile: bundled name, a YAML file from `longtune probe`
    # Token chunks per activation class. auto: one per 512 tokens of a sequence, 1 to 16 (a chunk much shorter
    # than that costs more in per-chunk overhead than its finer split saves).
    plan_chunks: Union[Literal["auto"], int] = "auto"
    plan_time_limit_s: float = Field(10.0, gt=0)
    plan_gap: float = Field(0.01, ge=0, lt=1)
    # layers whose offloaded activations come back ahead of backward; 0: each layer's when its backward starts
    # (one layer's staging/prefetch buffers on the device instead of two, its copies not hidden behind compute)
    prefetch_depth: int = Field(1, ge=0, le=4)
    # fp32 master weights + Adam moments: on the GPU (torch AdamW), host RAM or NVMe (stepped on the CPU
    # during backward); decoder-layer weights: on the GPU, or streamed one layer ahead from host or NVMe.
    # auto: the GPU while it holds them with room for activations, else host, else NVMe.
    optimizer: Literal["gpu", "cpu", "nvme", "auto"] = "gpu"
    params: Literal["gpu", "cpu", "nvme", "auto"] = "gpu"
    tiers: TiersConfig = TiersConfig()  # `auto` (all null) or capacities
    nvme_path: Optional[str] = None  # folder for the NVMe tier's swap files (scratch: removed at exit)
    nvme_checksum: bool = True  # verify every NVMe read: a corrupt or short read is an error, not garbage
    nvme_backend: Literal["auto", "threads", "aio"] = "auto"  # aio: DeepSpeed's libaio op (needs libaio-dev)
    cpu_adam: Literal["auto", "torch", "deepspeed"] = "auto"  # CPU AdamW: auto = torch fused (bitwise); deepspeed builds its op

    @field_validator("tiers", mode="before")
    @classmethod
    def _auto_tiers(cls, value):
        return {} if value == "auto" else value

    @field_validator("plan_chunks")
    @classmethod
    def _chunk_count(cls, value):
        if value != "auto" and not 1 <= value <= 64:
            raise ValueError("must be auto or 1..64")
        return value

    @field_validator("budget_gb", mode="before")
    @classmethod
    def _finite_budget(cls, value):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"got {value}; must be a finite number > 0 (GB), auto, or null")
        return value

    @field_validator("budget_gb")
    @classmethod
    def _positive_budget(cls, value):
        if value is not None and value != "auto" and value <= 0:
            raise ValueError("must be > 0 (GB), auto, or null")
        return value

    @model_validator(mode="after")
    def _tiers_fit(self) -> "MemoryConfig":
        if self.gradient_checkpointing and (self.budget_gb is not None or self.plan != "auto"):
            raise ValueError("memory.gradient_checkpointing and a memory plan (memory.budget_gb / memory.plan) both decide "
                             "what is recomputed: the plan recomputes by itself; drop gradient_checkpointing")
        if self.params not in ("gpu", "auto") and self.optimizer == "gpu":
            raise ValueError(f"memory.params={self.params} needs the optimizer off the GPU too: set memory.optimizer to cpu, nvme or auto")
        if "nvme" in (self.optimizer, self.params) and not self.nvme_path:
            raise ValueError("memory.optimizer or memory.params is nvme: set memory.nvme_path to a folder on the NVMe drive")
        return self


class CheckpointConfig(_Section):
    every_n_steps: int = Field(0, ge=0)  # 0: only at the end
    keep_last: int = Field(2, gt=0)
    save_final: bool = True


class RunConfig(_Section):
    output_dir: str = "runs/quickstart"
    resume: Optional[str] = None  # null | auto | path of a step_N folder
    # auto: a GPU per process where torch sees one (rank r on cuda:LOCAL_RANK, NCCL), else the CPU (gloo);
    # cpu: the CPU even on a GPU machine (e.g. more processes than GPUs); cuda: refuse to run without a GPU
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("output_dir")
    @classmethod
    def _a_folder(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("a folder for the run (an empty path would train into the current folder)")
        return v


class LogConfig(_Section):
    every_n_steps: int = Field(1, gt=0)
    sinks: list[Literal["console", "jsonl", "tensorboard"]] = ["console", "jsonl"]


class ParallelConfig(_Section):
    """How the processes of a multi-process run (torchrun, Ray) share the work: trainer/parallel.py."""

    # auto: single with one process, ddp with more. ddp: torch DDP (or, where the optimizer takes each gradient
    # during backward, its own all-reduce); fsdp2: fully_shard per decoder layer; deepspeed: ZeRO stage 1-3.
    strategy: Literal["auto", "single", "ddp", "fsdp2", "deepspeed"] = "auto"
    timeout_s: float = Field(600.0, gt=0, le=1e7)  # a collective waiting longer fails the run (a lost rank) instead of hanging
    fsdp_bf16: bool = False  # FSDP2: bf16 parameters in forward/backward, gradients reduced in fp32
    fsdp_reshard_after_forward: bool = True  # FSDP2: free each layer's gathered weights after its forward
    zero_stage: int = Field(2, ge=1, le=3)  # DeepSpeed ZeRO stage
    offload_optimizer: Literal["none", "cpu"] = "none"  # DeepSpeed ZeRO-Offload of the optimizer state
    offload_params: Literal["none", "cpu"] = "none"  # DeepSpeed ZeRO-3 parameter offload
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON of your own; longtune fills batch, clipping, precision
    # Ulysses sequence parallelism: each sequence is cut into this many contiguous shards, one per rank, and
    # attention runs over the group by all-to-all (trainer/sequence_parallel.py). world = data parallel x this.
    sequence_parallel: int = Field(1, ge=1)


class RayLaunchConfig(_Section):
    address: Optional[str] = None  # null: start a local cluster bound to 127.0.0.1; auto or ray://host:port: join one
    num_workers: int = Field(2, gt=0)
    use_gpu: Optional[bool] = None  # null: when this machine has a GPU
    resources_per_worker: dict[str, float] = {}  # e.g. {CPU: 4, GPU: 1}
    max_failures: int = Field(0, ge=-1)  # worker-group restarts after a lost worker (-1: no limit)
    storage_path: Optional[str] = None  # where Ray keeps the reported checkpoints; null: <run.output_dir>/ray
    name: Optional[str] = None  # the Ray run's name; null: the run folder's name. Same name and storage: resume


class LaunchConfig(_Section):
    """Where the processes run. torchrun needs no setting: `torchrun ... -m longtune.launch.torchrun CFG`, or
    `longtune train CFG --nproc N`; a group already set up (torchrun, Ray, accelerate) is joined as it is."""

    backend: Literal["local", "ray"] = "local"
    ray: RayLaunchConfig = RayLaunchConfig()


class AdapterConfig(_Section):
    """adapter.kind=lora: low-rank adapters (peft's LoRA) beside frozen base weights; only they train, only they and
    their optimizer state are checkpointed (trainer/adapters.py). adapter.kind=qlora: the same over a base whose
    decoder-layer linear weights are kept in 4-bit NF4 (bitsandbytes)."""

    kind: Literal["none", "lora", "qlora"] = "none"
    rank: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LAYER_MATRIX_NAMES), min_length=1)
    # modules that train in full beside the adapters (peft's modules_to_save: a trained copy of each, the original
    # kept frozen), each name the end of module names as peft matches them: lm_head, embed_tokens, input_layernorm
    modules_to_save: list[str] = Field(default_factory=list)
    # qlora: the dtype the 4-bit base's matmuls run in (its weights de-quantized to it); auto: model.dtype
    compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # qlora: the per-64-weight absmax scales themselves quantized to 8 bits (bitsandbytes' compress_statistics)
    double_quant: bool = True

    @model_validator(mode="after")
    def _qlora_settings_need_qlora(self):
        if self.kind != "qlora":
            for key in ("compute_dtype", "double_quant"):
                if getattr(self, key) != type(self).model_fields[key].default:
                    raise ValueError(f"adapter.{key} is a QLoRA setting but adapter.kind={self.kind}: set "
                                     "adapter.kind=qlora, or drop it")
        return self


class Config(_Section):
    model: ModelConfig
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    memory: MemoryConfig = MemoryConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    run: RunConfig = RunConfig()
    log: LogConfig = LogConfig()
    parallel: ParallelConfig = ParallelConfig()
    launch: LaunchConfig = LaunchConfig()
    adapter: AdapterConfig = AdapterConfig()

    @model_validator(mode="after")
    def _adapter_fits_the_rest(self):
        a = self.adapter
        if a.kind == "none":
            if a != AdapterConfig():
                raise ValueError("adapter.* is set but adapter.kind is none: set adapter.kind=lora or qlora to use it")
            return self
        if self.optim.name != "adamw":
            raise ValueError(f"adapter.kind={a.kind} trains the adapters with AdamW; optim.name={self.optim.name} projects "
                             "full weights' gradients: use one or the other")
        if self.memory.params in ("cpu", "nvme"):
            raise ValueError(f"adapter.kind={a.kind}: the frozen base weights stay on the GPU (memory.params="
                             f"{self.memory.params} streams trained weights); set memory.params to gpu or auto")
        if a.kind == "qlora":
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ValueError("adapter.kind=qlora keeps the base weights in 4 bits through bitsandbytes, which is not "
                                 "installed: pip install bitsandbytes (or adapter.kind=lora)")
            if self.parallel.strategy in ("fsdp2", "deepspeed"):
                raise ValueError(f"adapter.kind=qlora runs with parallel.strategy single or ddp, not "
                                 f"{self.parallel.strategy}: sharding bitsandbytes' packed 4-bit weights (their "
                                 "quantization state kept apart) is not supported; use parallel.strategy=ddp (each rank "
                                 "holds the 4-bit base, about half a byte a weight)")
        if self.parallel.strategy == "deepspeed":
            raise ValueError(f"adapter.kind={a.kind} runs with parallel.strategy single, ddp or fsdp2, not deepspeed")
        return self

    @model_validator(mode="after")
    def _strategy_fits_the_rest(self):
        p, mem, default = self.parallel, self.memory, ParallelConfig()
        if p.strategy != "deepspeed":
            for key in ("zero_stage", "offload_optimizer", "offload_params", "deepspeed_config"):
                if getattr(p, key) != getattr(default, key):
                    raise ValueError(f"parallel.{key} is a DeepSpeed setting but parallel.strategy={p.strategy}: set "
                                     "parallel.strategy=deepspeed, or drop it")
        if p.strategy != "fsdp2" and (p.fsdp_bf16, p.fsdp_reshard_after_forward) != (False, True):
            raise ValueError(f"parallel.fsdp_* are FSDP2 settings but parallel.strategy={p.strategy}: set "
                             "parallel.strategy=fsdp2, or drop them")
        if p.offload_params != "none" and p.zero_stage != 3:
            raise ValueError("parallel.offload_params needs ZeRO stage 3 (parallel.zero_stage=3)")
        if p.strategy in ("fsdp2", "deepspeed"):
            owner = "FSDP2" if p.strategy == "fsdp2" else "DeepSpeed"
            if mem.optimizer not in ("gpu", "auto") or mem.params not in ("gpu", "auto"):
                way = "parallel.offload_optimizer / parallel.offload_params (ZeRO-Offload)" if p.strategy == "deepspeed" \
                    else "parallel.strategy=deepspeed with parallel.offload_optimizer=cpu, or parallel.strategy=ddp"
                raise ValueError(f"parallel.strategy={p.strategy}: {owner} owns the optimizer state and the weights, so "
                                 f"memory.optimizer and memory.params must stay gpu; to move them off the GPU use {way}")
            if self.optim.name != "adamw":
                raise ValueError(f"optim.name={self.optim.name} runs with parallel.strategy single or ddp; "
                                 f"{owner} steps its own AdamW")
        return self

    @model_validator(mode="after")
    def _galore_fits_the_rest(self):
        o = self.optim
        if o.name != "galore_adamw":
            if o.galore != GaloreConfig():
                raise ValueError("optim.galore is set but optim.name is adamw: set optim.name=galore_adamw to use it")
            return self
        if o.galore.layerwise and self.train.clip_grad_norm is not None:
            raise ValueError("optim.galore.layerwise updates each weight during backward, before the global gradient "
                             "norm is known, so it cannot clip: set train.clip_grad_norm=null")
        if o.galore.eight_bit and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("optim.galore.eight_bit needs bitsandbytes, which is not installed: pip install bitsandbytes")
        if self.memory.optimizer == "nvme" or self.memory.params in ("cpu", "nvme"):
            raise ValueError("optim.name=galore_adamw keeps its moments on the device or the host and its weights on "
                             "the device: set memory.optimizer to gpu, cpu or auto and memory.params to gpu or auto")
        return self


# --- loading ---------------------------------------------------------------------------

BUNDLED_DIR = resources.files("longtune.configs")


def bundled_config_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in BUNDLED_DIR.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a config shipped with longtune (`quickstart`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config {name_or_path} is a folder; give a YAML file")
    bundled = BUNDLED_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if "/" not in name_or_path and bundled.is_file():
        return Path(str(bundled))
    hint = f"; bundled configs: {', '.join(bundled_config_names())}"
    raise ConfigError(f"config file not found: {name_or_path}{hint}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (a section, or a key in it): YAML keeps the last
    silently, and a config that says `max_steps: 3` then `max_steps: 500` is a mistake, not a choice."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = safe_load_unique(path.read_text())
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text YAML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    if data is None:
        raise ConfigError(f"config {path} is empty; it needs at least a model section (see configs/quickstart.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003); the value is typed by YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override key {key!r} has an empty part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket): take it as a string
    # YAML 1.1 reads `1e-4` (no dot) as a string; the typed schema turns it into a float.
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    data = read_yaml(resolve_config_path(str(path))) if path is not None else {}
    return validate(apply_overrides(data, list(overrides)))


def validate(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e)) from None


def describe_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the key path and the fix."""
    lines = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(loc) or "(top level)"
        kind = item["type"]
        if kind == "extra_forbidden":
            lines.append(_unknown_key_message(loc))
        elif kind == "missing" and loc and loc[-1].isdigit():  # a tuple given too few items
            lines.append(f"{'.'.join(loc[:-1])}: too few values (item {int(loc[-1]) + 1} is missing)")
        elif kind == "missing":
            lines.append(f"missing required key {key}")
        elif kind == "value_error":
            lines.append(f"{key + ': ' if loc else ''}{item['msg'].removeprefix('Value error, ')}")
        else:
            given = item.get("input")
            lines.append(f"{key}: got {given!r}; expected {_expected(item)}")
    return "; ".join(lines)


def _expected(item: dict[str, Any]) -> str:
    ctx = item.get("ctx") or {}
    if "expected" in ctx:
        return f"one of {ctx['expected']}"
    bounds = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    for name, sign in bounds.items():
        if name in ctx:
            return f"a number {sign} {ctx[name]}"
    msg = item["msg"].removeprefix("Input should be ")
    return msg[:1].lower() + msg[1:]


# What other tools (HF Trainer, torchtune, axolotl, LLaMA-Factory) call our keys, for the "did you mean" hint.
ALIASES = {
    "learning_rate": "train.lr", "lr": "train.lr", "max_steps": "train.max_steps", "steps": "train.max_steps",
    "batch_size": "train.micro_batch_size", "per_device_train_batch_size": "train.micro_batch_size",
    "micro_batch_size": "train.micro_batch_size", "gradient_accumulation_steps": "train.grad_accum_steps",
    "grad_accum": "train.grad_accum_steps", "warmup": "train.warmup_steps", "warmup_steps": "train.warmup_steps",
    "lr_scheduler_type": "train.schedule", "lr_scheduler": "train.schedule", "max_grad_norm": "train.clip_grad_norm",
    "bf16": "train.mixed_precision", "seed": "train.seed", "sequence_len": "data.seq_len",
    "max_seq_length": "data.seq_len", "max_seq_len": "data.seq_len", "seq_length": "data.seq_len",
    "max_length": "data.seq_len", "dataset": "data.path", "data_path": "data.path", "sample_packing": "data.packing",
    "model_name_or_path": "model.path", "base_model": "model.path", "torch_dtype": "model.dtype",
    "gradient_checkpointing": "memory.gradient_checkpointing", "output_dir": "run.output_dir",
    "resume_from_checkpoint": "run.resume", "save_steps": "checkpoint.every_n_steps",
    "save_total_limit": "checkpoint.keep_last", "logging_steps": "log.every_n_steps",
    "adam_beta1": "optim.betas", "adam_beta2": "optim.betas", "adam_epsilon": "optim.eps",
    "weight_decay": "optim.weight_decay", "optimizer": "optim.name",
}


def _unknown_key_message(loc: list[str]) -> str:
    *parents, name = loc
    valid = _valid_keys(parents)
    where = f"in section {'.'.join(parents)}" if parents else "at the top level"
    return f"unknown key {'.'.join(loc)} {where}; " + _suggestion(parents, name, valid)


def _suggestion(parents: list[str], name: str, valid: list[str]) -> str:
    """The closest valid key: in the same section, then a key of that name (or alias) anywhere, else the list."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return f"did you mean {'.'.join([*parents, close[0]])}?"
    everywhere = _all_keys()
    lowered = name.lower()
    for candidate in (lowered, *difflib.get_close_matches(lowered, list(ALIASES), n=1, cutoff=0.75)):
        if candidate in ALIASES:
            return f"did you mean {ALIASES[candidate]}?"
    by_name = {path.rsplit(".", 1)[-1]: path for path in everywhere}
    close = difflib.get_close_matches(lowered, list(by_name), n=1, cutoff=0.75)
    if close:
        return f"did you mean {by_name[close[0]]}?"
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if close:
        return f"did you mean {'.'.join([*parents, close[0]])}?"
    return f"valid keys: {', '.join(valid)}"


def _all_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """Every leaf key path of the schema (train.lr, memory.tiers.host_gb, ...)."""
    model = model or Config
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += _all_keys(annotation, path + ".")
        else:
            out.append(path)
    return out


def _valid_keys(parents: list[str]) -> list[str]:
    model: type[BaseModel] = Config
    for part in parents:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
