"""The planning problem as plain numbers: layer sizes and times, tiers, the GPU budget.

Nothing here imports torch: `longtune plan` builds a Problem from a config alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from .inventory import LayerShape, attention_backward_workspace, class_bytes_per_token
from .timeline import device_state_rows, state_rows
from .vocabulary import CLASSES, STATE_PLACES, TIER_NAMES

GB = 1e9


@dataclass(frozen=True)
class Tier:
    """Memory off the GPU: capacity, and bandwidth each way over the link to the GPU."""

    name: str
    capacity_bytes: float
    to_gpu_bps: float
    from_gpu_bps: float


class ProfileError(ValueError):
    """A machine profile that cannot be used; the message names the key."""


def _number(d: dict, key: str, where: str, *, positive: bool = True, default=None, at_most=None) -> float:
    value = d.get(key, default)
    if value is None:
        raise ProfileError(f"{where}.{key} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProfileError(f"{where}.{key} must be a finite number, got {value!r}")
    if (value <= 0) if positive else (value < 0):
        raise ProfileError(f"{where}.{key} must be {'> 0' if positive else '>= 0'}, got {value}")
    if at_most is not None and value > at_most:
        raise ProfileError(f"{where}.{key} must be <= {at_most}, got {value}")
    return float(value)


def _flag(d: dict, key: str, where: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ProfileError(f"{where}.{key} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class Machine:
    name: str
    gpu_bytes: float
    bf16_flops: float
    matmul_efficiency: float
    attention_efficiency: float
    tiers: tuple[Tier, ...]
    hbm_bps: float = 3.0e12  # device memory bandwidth (the GPU AdamW step streams weights, grads, moments)
    cpu_adam_params_per_s: float = 1.5e9  # host AdamW throughput (bench/cpu_adam.py: 100M params in 0.067 s, 2 cores)
    # All-to-all bandwidth per GPU between the GPUs of a node (sequence parallelism), each way; and how many GPUs
    # a node has: they share its host RAM and drives (the tiers' capacities are the node's).
    interconnect_bps: float = 200e9
    gpus_per_node: int = 1
    # Whether copies, the tiers' I/O and the host's optimizer step run beside the device's compute (a GPU: its copy
    # engines and the host's cores) or take their time from it (the CPU as the device: one set of cores for all).
    overlaps_transfers: bool = True
    # The runtime's recompute of a chunk's pre part (norm, q/k/v, RoPE) and post part (o_proj, norm, MLP) against its
    # FLOPs at the matmul rate (`longtune probe --config` times a plan that recomputes everything): a recompute is a
    # forward alone, in small pieces, without the backward's larger matmuls to share its elementwise costs.
    pre_recompute_factor: float = 1.0
    post_recompute_factor: float = 1.0

    @classmethod
    def from_dict(cls, d: dict) -> "Machine":
        """A profile as `longtune probe` writes it; every number is checked (ProfileError names the key)."""
        if not isinstance(d, dict):
            raise ProfileError(f"a machine profile is a mapping, got {type(d).__name__}")
        gpu = d.get("gpu")
        if not isinstance(gpu, dict):
            raise ProfileError("gpu: missing (memory_gb, bf16_tflops, matmul_efficiency, attention_efficiency)")
        raw_tiers = d.get("tiers") or {}
        if not isinstance(raw_tiers, dict):
            raise ProfileError(f"tiers must be a mapping of {', '.join(TIER_NAMES)}, got {type(raw_tiers).__name__}")
        tiers = []
        for name, t in raw_tiers.items():
            if name not in TIER_NAMES:
                raise ProfileError(f"tiers.{name}: unknown tier; expected {', '.join(TIER_NAMES)}")
            if not isinstance(t, dict):
                raise ProfileError(f"tiers.{name} must be a mapping (capacity_gb, to_gpu_gbps, from_gpu_gbps)")
            where = f"tiers.{name}"
            cap = _number(t, "capacity_gb", where, positive=False)
            to_gpu, from_gpu = _number(t, "to_gpu_gbps", where), _number(t, "from_gpu_gbps", where)
            if cap > 0:
                tiers.append(Tier(name, cap * GB, to_gpu * GB, from_gpu * GB))
        host = raw_tiers.get("host") if isinstance(raw_tiers.get("host"), dict) else {}
        factors = gpu.get("recompute_factor") or {}
        if not isinstance(factors, dict) or set(factors) - {"pre", "post"}:
            raise ProfileError(f"gpu.recompute_factor must be a mapping of pre and post, got {factors!r}")
        return cls(
            str(d.get("name", "unnamed")),
            _number(gpu, "memory_gb", "gpu") * GB,
            _number(gpu, "bf16_tflops", "gpu") * 1e12,
            _number(gpu, "matmul_efficiency", "gpu", at_most=1.0),
            _number(gpu, "attention_efficiency", "gpu", at_most=1.0),
            tuple(tiers),
            _number(gpu, "hbm_gbps", "gpu", default=3000.0) * GB,
            _number(host, "cpu_adam_gparams_per_s", "tiers.host", default=1.5) * 1e9,
            _number(gpu, "interconnect_gbps", "gpu", default=200.0) * GB,
            int(_number(d, "gpus_per_node", "machine", default=1)),
            _flag(gpu, "overlaps_transfers", "gpu", default=True),
            *(_number(factors, part, "gpu.recompute_factor", default=1.0) for part in ("pre", "post")),
        )

    @classmethod
    def load(cls, name_or_path: str) -> "Machine":
        """A machine profile YAML file, or the name of a bundled one (h100-pcie5, h200-pcie5)."""
        path = Path(name_or_path)
        if not path.is_file():
            bundled = resources.files("longtune.planner") / "machines" / f"{name_or_path}.yaml"
            if not bundled.is_file():
                raise FileNotFoundError(f"machine profile {name_or_path} not found; bundled: {', '.join(bundled_machines())}")
            path = Path(str(bundled))
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ProfileError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ProfileError(f"cannot read {path}: {e}") from None
        try:
            return cls.from_dict(data)
        except ProfileError as e:
            raise ProfileError(f"{path}: {e}") from None

    def with_capacities(self, gpu_bytes: Optional[float] = None, **tier_bytes: Optional[float]) -> "Machine":
        """The same machine with what a run may use of each tier (None: the profile's figure). A tier given a
        capacity but absent from the profile gets the host's bandwidth (cxl) or is left out (nvme)."""
        tiers = {t.name: t for t in self.tiers}
        for name, cap in tier_bytes.items():
            if cap is None:
                continue
            if name in tiers:
                tiers[name] = replace(tiers[name], capacity_bytes=float(cap))
            elif name == "cxl" and "host" in tiers and cap > 0:
                tiers[name] = replace(tiers["host"], name="cxl", capacity_bytes=float(cap))
        kept = tuple(t for t in tiers.values() if t.capacity_bytes > 0)
        return replace(self, gpu_bytes=self.gpu_bytes if gpu_bytes is None else float(gpu_bytes), tiers=kept)


def ranks_per_node(machine: Machine, world: int) -> int:
    """How many of `world` ranks share one node of `machine` (its host RAM and drives)."""
    return max(1, min(world, machine.gpus_per_node))


def drives_shared(machine: Machine, world: int) -> Machine:
    """The machine as one of `world` ranks sees it: the node's NVMe drives are shared by its ranks, so each gets
    that share of their bandwidth. (Each GPU has its own host link.)"""
    sharing = ranks_per_node(machine, world)
    if sharing == 1:
        return machine
    tiers = tuple(replace(t, to_gpu_bps=t.to_gpu_bps / sharing, from_gpu_bps=t.from_gpu_bps / sharing)
                  if t.name == "nvme" else t for t in machine.tiers)
    return replace(machine, tiers=tiers)


def bundled_machines() -> list[str]:
    folder = resources.files("longtune.planner") / "machines"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


@dataclass(frozen=True)
class StateOption:
    """Where the optimizer state and the decoder weights live, what that holds on the GPU and in each tier, and
    what it costs: link time per layer (weights in during the forward and again in backward, gradients out in
    backward) and time the step cannot hide (the CPU AdamW tail, NVMe state traffic)."""

    optimizer: str  # gpu | cpu | nvme
    params: str  # gpu | cpu | nvme
    gpu_bytes: dict[str, float]  # weights, grads, optimizer
    tier_bytes: dict[str, float]  # host / nvme
    exposed_s: float = 0.0
    fwd_h2d_s: float = 0.0
    bwd_h2d_s: float = 0.0
    bwd_d2h_s: float = 0.0
    # GPU bytes at each of timeline.positions() where they change over the step (timeline.state_rows); empty:
    # gpu_bytes at every one. gpu_bytes then holds each part's peak, for the reports.
    gpu_rows: tuple[float, ...] = ()

    @property
    def name(self) -> str:
        return f"optimizer={self.optimizer} params={self.params}"

    @property
    def gpu_total(self) -> float:
        """The state's GPU bytes at their peak."""
        return max(self.gpu_rows) if self.gpu_rows else sum(self.gpu_bytes.values())

    def gpu_at(self, position: int) -> float:
        """GPU bytes at timeline.positions()[position]."""
        return self.gpu_rows[position] if self.gpu_rows else sum(self.gpu_bytes.values())


@dataclass(frozen=True)
class Problem:
    """Everything the solver needs, per layer identical except where lists say otherwise.

    Sizes are bytes, times seconds. A class's tokens are cut into `chunks`
    equal chunks; a decision gives each chunk a place: GPU, a tier, or recompute.
    """

    num_layers: int
    chunks: int
    chunk_bytes: dict[str, float]  # one token chunk of each class, one layer
    recompute_s: dict[str, float]  # time to recompute one chunk; classes absent here cannot be recomputed
    all_or_nothing: tuple[str, ...]  # classes whose chunks must all go to one place
    layer_fwd_s: float
    layer_bwd_s: float
    head_s: float  # the LM head and loss, forward + backward: the first prefetch hides behind it
    fixed_bytes: dict[str, float]  # on the GPU whatever the plan: RoPE tables, ...
    layer_workspace_bytes: float  # one layer's backward in the runtime while a chunk's graph runs (+ the recompute)
    head_bytes: float  # final norm's saved tensors + logits / loss workspace
    budget_bytes: float
    tiers: tuple[Tier, ...]
    state_options: tuple[StateOption, ...] = ()  # the MILP picks one; empty: nothing of the state is planned
    prefetch_depth: int = 1  # layers prefetched ahead in backward
    offload_activations: bool = True  # False: autograd keeps every activation (no activation runtime)
    # Each second of link time (hidden or not) adds this fraction of a second to the objective,
    # so ties go to keeping over moving, and to the faster tier over the slower one.
    transfer_penalty: float = 1e-6
    # The same backward while a chunk's attention backward runs (no chunk graph, no recomputed chunk alive then),
    # and one layer's forward: a row holds the largest of the three (timeline.backward_phase_bytes).
    attention_phase_bytes: float = 0.0
    forward_workspace_bytes: float = 0.0
    overlap: bool = True  # transfers hide behind compute (Machine.overlaps_transfers); False: every one adds to the step
    meta: dict = field(default_factory=dict, compare=False)

    def hides(self, seconds: float) -> float:
        """Of `seconds` of compute, what a transfer can hide behind: all of it, or none without overlap."""
        return seconds if self.overlap else 0.0

    @property
    def fixed_total(self) -> float:
        return sum(self.fixed_bytes.values())

    def with_budget(self, budget_bytes: float) -> "Problem":
        return replace(self, budget_bytes=budget_bytes)

    def state(self, name: Optional[str]) -> Optional[StateOption]:
        """The state option called `name`; None picks the only one (or none when there is none)."""
        if name is None:
            if len(self.state_options) > 1:
                raise ValueError(f"several state options ({', '.join(o.name for o in self.state_options)}): name one")
            return self.state_options[0] if self.state_options else None
        for o in self.state_options:
            if o.name == name:
                return o
        raise ValueError(f"no state option {name!r}; the problem has {', '.join(o.name for o in self.state_options)}")


@dataclass(frozen=True)
class ModelShape:
    """A decoder layer's shape (inventory.LayerShape) and what the whole model adds."""

    layer: LayerShape
    num_layers: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def from_hf_config(cls, d: dict, dtype: str) -> "ModelShape":
        return cls(LayerShape.from_hf_config(d, dtype), d["num_hidden_layers"], d["vocab_size"],
                   bool(d.get("tie_word_embeddings", False)))

    @property
    def q_dim(self) -> int:
        return self.layer.num_heads * self.layer.head_dim

    @property
    def kv_dim(self) -> int:
        return self.layer.num_kv_heads * self.layer.head_dim

    @property
    def pre_matmul_params(self) -> int:  # q, k, v projections
        return self.layer.hidden * (self.q_dim + 2 * self.kv_dim)

    @property
    def post_matmul_params(self) -> int:  # o projection and the gated MLP
        return self.q_dim * self.layer.hidden + 3 * self.layer.hidden * self.layer.intermediate

    def layer_matrices(self) -> list[tuple[int, int]]:
        """(rows, cols) of a decoder layer's projection weights: q, k, v, o, gate, up, down (GaLore's targets)."""
        h, q, kv, i = self.layer.hidden, self.q_dim, self.kv_dim, self.layer.intermediate
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]

    @property
    def layer_params(self) -> int:
        norms = 2 * self.layer.hidden + (2 * self.layer.head_dim if self.layer.qk_norm else 0)
        return self.pre_matmul_params + self.post_matmul_params + norms

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.layer.hidden * (1 if self.tied_embeddings else 2)
        return self.num_layers * self.layer_params + embeddings + self.layer.hidden


def step_flops(shape: ModelShape) -> tuple[float, float]:
    """One training step of one sequence of T tokens as build_problem prices it (forward and backward, nothing
    recomputed): (FLOPs per token, at the matmul rate; FLOPs per token squared, at the attention rate). Every
    matmul runs three times (forward; the input's and the weight's gradients), the LM head's included; causal
    attention's forward is 2 T^2 q_dim FLOPs and its backward 2.5 times that (flash)."""
    matmul = 6 * (shape.num_layers * (shape.pre_matmul_params + shape.post_matmul_params) + shape.layer.hidden * shape.vocab)
    return float(matmul), 7.0 * shape.num_layers * shape.q_dim


def fitted_rates(shape: ModelShape, seconds: dict[int, float], attention_rate: Optional[float] = None) -> tuple[float, float]:
    """The matmul and attention rates (FLOP/s) at which the planner's compute of a step equals the model's own
    step times measured at two lengths ({tokens: seconds}; `longtune probe --config`): a step is a T + b T^2
    seconds, so two lengths give a (the matmuls, and every cost that grows with the tokens: norms, activations,
    the loss) and b (attention). Where the attention is too small beside the rest to show (b <= 0: a small
    model's fixed costs shrink per token as the length grows), `attention_rate` (the attention kernel's own,
    measured) prices it and a is fitted to the longer length."""
    if len(seconds) != 2:
        raise ValueError(f"two lengths are needed, got {sorted(seconds)}")
    (t1, s1), (t2, s2) = sorted(seconds.items())
    matmul, attention = step_flops(shape)
    b = (s2 / t2 - s1 / t1) / (t2 - t1)
    a = s1 / t1 - b * t1
    if b <= 0 and attention_rate:
        b = attention / attention_rate
        a = s2 / t2 - b * t2
    if a <= 0 or b <= 0:
        raise ValueError(f"step times {s1:.3f} s at {t1} tokens and {s2:.3f} s at {t2} do not grow as a T + b T^2 "
                         "(too noisy, or lengths too close): measure again, or at lengths further apart")
    return matmul / a, attention / b


# Host bytes per parameter with the optimizer off the GPU: fp32 master, two moments, the fp32 gradient sum;
# on NVMe the master and moments go to the drive and the gradient sum stays on the host.
HOST_OPTIMIZER_BYTES, NVME_OPTIMIZER_BYTES, NVME_HOST_OPTIMIZER_BYTES = 16, 12, 4
# Staging buffers an optimizer on NVMe reads and writes its state through (offload/optimizer.py, which is told the
# number by the Plan: Plan.nvme_state_stagings): one group's state is read in while the previous one's is written back.
NVME_STATE_STAGINGS = 2


def optimizer_host_buffers(tier: str) -> int:
    """fp32 buffers of the largest parameter group (a decoder layer, or the embeddings, head and final norm) that
    an optimizer off the GPU holds on the host beside its per-parameter state (offload/optimizer.py), at most: a
    micro-batch's gradient before it is summed and, on NVMe, the stagings of master weights + two moments.
    (Adapters' bound; optimizer_host_buffer_bytes counts a full model's exactly.)"""
    return {"cpu": 1, "nvme": 1 + NVME_STATE_STAGINGS * 3}.get(tier, 0)


def optimizer_host_buffer_bytes(tier: str, other_params: int, layer_params: int, num_layers: int,
                                accumulation: int = 1) -> float:
    """Bytes of the fp32 buffers an optimizer off the GPU holds on the host beside its per-parameter state
    (offload/optimizer.py), its parameter groups being the weights outside the decoder layers (group 0) and one per
    decoder layer (group g: layer g - 1): on NVMe, staging k of NVME_STATE_STAGINGS holds the master weights and two
    moments of groups k, k + S, ... in turn and is sized for the largest of them; with accumulation, a
    micro-batch's gradient before it is summed (the largest group; made with the first such step)."""
    if tier not in ("cpu", "nvme"):
        return 0.0
    groups = [other_params] + [layer_params] * num_layers
    elements = max(groups) if accumulation > 1 else 0
    if tier == "nvme":
        S = NVME_STATE_STAGINGS
        elements += sum(3 * max(groups[k::S], default=0) for k in range(S))
    return 4.0 * elements


LAYER_MATRIX_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # layer_matrices order


NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256  # weights per absmax scale; scales per fp32 scale of the scales (double quant)


def nf4_bytes(n: int, double_quant: bool) -> int:
    """Bytes of one n-weight matrix in bitsandbytes' 4-bit NF4 (Params4bit and its QuantState, as they are on the
    device): two weights a byte, an absmax per 64 weights (fp32, or with double quant uint8 codes with an fp32
    absmax per 256 of them, a 256-entry fp32 code book and an fp32 offset) and the 16-entry fp32 NF4 code book."""
    blocks = -(-n // NF4_BLOCK)
    scales = blocks + 4 * -(-blocks // NF4_NESTED_BLOCK) + 4 * 256 + 4 if double_quant else 4 * blocks
    return -(-n // 2) + scales + 4 * 16


@dataclass(frozen=True)
class AdapterSizing:
    """LoRA adapters (trainer/adapters.py) on the named projections of every decoder layer: rank-r A [r, in] and
    B [out, r] in the weights' dtype; they alone train, so only they have gradients and optimizer state.
    `quantized` (QLoRA): the frozen base's decoder-layer projections are 4-bit NF4 (nf4_bytes), de-quantized one
    matrix at a time into `compute_bytes`-byte elements for each matmul.
    `saved` (adapter.modules_to_save): modules that train in full beside the adapters, each a trained copy in the
    weights' dtype with its gradient and optimizer state, the frozen original kept (in the base)."""

    rank: int
    targets: tuple[str, ...] = LAYER_MATRIX_NAMES
    quantized: bool = False
    double_quant: bool = True
    compute_bytes: Optional[int] = None  # QLoRA's compute dtype; None: the weights' dtype
    saved: tuple[str, ...] = ()  # modules_to_save, as peft matches them: the end of a module's name

    def saved_params(self, shape: ModelShape) -> tuple[int, int, int, bool]:
        """The saved modules' parameters: (all of them, the most in one decoder layer, those outside the layers,
        whether the LM head's weight trains). Each name selects, as peft's modules_to_save does, every module whose
        name ends with it and the modules inside it; the modules are transformers' names for the supported
        families (the weights they hold; biases not counted). A tied LM head is the embeddings' weight: one trained
        copy for either name or both (peft's ensure_weight_tying)."""
        if not self.saved:
            return 0, 0, 0, False
        h, L = shape.layer.hidden, shape.num_layers
        layer = {"input_layernorm": h, "post_attention_layernorm": h}
        for name, (m, n) in zip(LAYER_MATRIX_NAMES, shape.layer_matrices()):
            layer[("self_attn." if name in LAYER_MATRIX_NAMES[:4] else "mlp.") + name] = m * n
        if shape.layer.qk_norm:
            layer["self_attn.q_norm"] = layer["self_attn.k_norm"] = shape.layer.head_dim
        embedding = shape.vocab * h

        def chosen(module: str) -> bool:  # the module, or one holding it, is named
            parts = module.split(".")
            return any(".".join(parts[:i]).endswith(s) for i in range(1, len(parts) + 1) for s in self.saved)

        per_layer = [sum(n for name, n in layer.items() if chosen(f"model.layers.{i}.{name}")) for i in range(L)]
        embeddings, head = chosen("model.embed_tokens"), chosen("lm_head")
        if shape.tied_embeddings:
            embeddings = head = embeddings or head
        other = embedding * embeddings + (embedding * head if not shape.tied_embeddings else 0) + h * chosen("model.norm")
        return sum(per_layer) + other, max(per_layer), other, head

    def base_bytes(self, shape: ModelShape) -> float:
        """GPU bytes of the frozen base: every weight in the weights' dtype, or (QLoRA) the layers' projections in
        NF4 and the rest (embeddings, head, norms) in the weights' dtype."""
        wb = shape.layer.dtype_bytes
        if not self.quantized:
            return float(shape.params * wb)
        mats = shape.layer_matrices()
        rest = shape.params - shape.num_layers * sum(m * n for m, n in mats)
        return float(rest * wb + shape.num_layers * sum(nf4_bytes(m * n, self.double_quant) for m, n in mats))

    def dequantized_bytes(self, shape: ModelShape) -> float:
        """QLoRA: the largest projection de-quantized for its matmul (forward, and the input gradient in backward),
        in the compute dtype, plus its copy in the weights' dtype first when the two differ; 0 without."""
        if not self.quantized:
            return 0.0
        wb = shape.layer.dtype_bytes
        cb = self.compute_bytes or wb
        return float(max(m * n for m, n in shape.layer_matrices()) * (cb + (wb if cb != wb else 0)))

    def lora_layer_params(self, shape: ModelShape) -> int:
        return sum(self.rank * (m + n) for name, (m, n) in zip(LAYER_MATRIX_NAMES, shape.layer_matrices())
                   if name in self.targets)

    def layer_params(self, shape: ModelShape) -> int:
        """What trains in a decoder layer (the most in one): its adapters and saved modules."""
        return self.lora_layer_params(shape) + self.saved_params(shape)[1]

    def params(self, shape: ModelShape) -> int:
        """Every parameter that trains: the adapters and the saved modules' copies."""
        return shape.num_layers * self.lora_layer_params(shape) + self.saved_params(shape)[0]

    def saved_bytes_per_token(self, shape: ModelShape) -> dict[str, float]:
        """What adapters add to a layer's saved activations per token: each target's rank-r A output, saved for
        B's gradient (A's input is the projection's, saved already). A frozen projection that is not a target
        saves no input for a weight gradient, which the plan does not subtract (it over-counts there)."""
        per_target = self.rank * shape.layer.dtype_bytes
        pre = sum(t in self.targets for t in LAYER_MATRIX_NAMES[:3])
        return {"pre": float(pre * per_target), "post": float((sum(t in self.targets for t in LAYER_MATRIX_NAMES) - pre)
                                                                * per_target)}


def _adapter_state_options(shape: ModelShape, machine: Machine, optimizer: str, adapter: AdapterSizing,
                           sharding: Sharding) -> tuple[StateOption, ...]:
    """The placements of an adapter run's state: the frozen base and the adapters on the GPU; the adapters' AdamW
    state there or on the host (their few MB never need a drive)."""
    wb = shape.layer.dtype_bytes
    a, layer_a, other_a = adapter.params(shape), adapter.layer_params(shape), adapter.saved_params(shape)[2]
    host_link = {t.name: t for t in machine.tiers}.get("host")
    out = []
    for opt in (("gpu", "cpu") if optimizer == "auto" else (optimizer,)):
        if opt == "nvme" or (opt == "cpu" and host_link is None):
            continue
        gpu = {"weights": adapter.base_bytes(shape) + a * wb,
               "grads": a * wb if opt == "gpu" else (other_a + 2 * layer_a) * wb,
               "optimizer": 2 * wb * a if opt == "gpu" else 0.0}
        tier, exposed, fwd, bwd_out = {}, 4 * wb * a * 2 / machine.hbm_bps, 0.0, 0.0
        if opt == "cpu":
            tier = {"host": HOST_OPTIMIZER_BYTES * a + optimizer_host_buffers("cpu") * 4 * max(layer_a, other_a)}
            exposed = a / machine.cpu_adam_params_per_s
            fwd, bwd_out = layer_a * wb / host_link.to_gpu_bps, layer_a * wb / host_link.from_gpu_bps
        out.append(StateOption(opt, "gpu", sharding.apply(gpu, layer_a * wb), tier, exposed, fwd, 0.0, bwd_out))
    if not out:
        raise ValueError(f"adapters keep their optimizer state on the GPU or the host, not memory.optimizer={optimizer}")
    return tuple(out)


@dataclass(frozen=True)
class GaloreSizing:
    """What the GaLore optimizer keeps (offload/galore.py), for the state's GPU bytes: the decoder layers'
    projection weights hold rank-r moments (and a basis unless the projector regenerates it); the rest full
    moments. Layer-wise, each gradient is freed in its hook; with accumulation the projected sums stay, and a
    weight refreshing its basis sums its full gradient (1/gap of them at a time when staggered)."""

    rank: int
    stores_basis: bool = True  # False for the `random` projector
    layerwise: bool = False
    accumulation: int = 1
    refreshing_share: float = 1.0
    eight_bit: bool = False  # moments at 1 byte an element plus a 4-byte scale per 256 (bitsandbytes' blocks)

    def bytes(self, shape: ModelShape) -> dict[str, float]:
        """GPU bytes of the optimizer state and of the gradients alive at the peak, and the target parameters."""
        wb, L = shape.layer.dtype_bytes, shape.num_layers
        mats = shape.layer_matrices()
        target_p = L * sum(m * n for m, n in mats)
        low = L * sum(min(self.rank, m, n) * max(m, n) for m, n in mats)
        basis = L * sum(min(self.rank, m, n) * min(m, n) for m, n in mats) if self.stores_basis else 0
        moment = 1 + 4 / 256 if self.eight_bit else wb
        moments, bases = 2 * moment * (shape.params - target_p + low), wb * basis
        optimizer = moments + bases
        if not self.layerwise:
            grads = shape.params * wb
        else:  # one layer's (or the head's) gradients at a time, plus what accumulation keeps
            other_p = shape.params - L * shape.layer_params
            grads = (other_p + 2 * shape.layer_params) * wb
            if self.accumulation > 1:
                grads += wb * (low + self.refreshing_share * target_p)
        return {"optimizer": float(optimizer), "grads": float(grads), "target_params": float(target_p),
                "moments": float(moments), "bases": float(bases), "moment_elements": float(shape.params - target_p + low)}


@dataclass(frozen=True)
class Sharding:
    """What a parallel strategy splits over its `world` ranks (each rank keeps 1/world of it): DDP nothing;
    ZeRO-1 the optimizer state; ZeRO-2 that and the gradients; ZeRO-3 and FSDP2 the weights too, gathering one
    layer (and the one prefetched) at a time, and holding one layer's full gradients until they are reduced."""

    world: int = 1
    optimizer: bool = False
    grads: bool = False
    weights: bool = False

    def apply(self, gpu: dict[str, float], layer_bytes: float) -> dict[str, float]:
        if self.world == 1:
            return gpu
        out = dict(gpu)
        if self.optimizer:
            out["optimizer"] = gpu["optimizer"] / self.world
        if self.grads:
            out["grads"] = gpu["grads"] / self.world + layer_bytes
        if self.weights:
            out["weights"] = gpu["weights"] / self.world + 2 * layer_bytes
        return out


def sequence_split_error(num_heads: int, num_kv_heads: int, degree: int) -> Optional[str]:
    """Why `degree` sequence-parallel ranks cannot split these attention heads (None: they can). Ulysses gives
    each rank 1/degree of the query heads; the key/value heads are split the same way, or repeated to one per
    rank when there are fewer of them than ranks."""
    if degree <= 1:
        return None
    if num_heads % degree:
        return f"num_attention_heads={num_heads} is not divisible by parallel.sequence_parallel={degree}"
    if num_kv_heads % degree and degree % num_kv_heads:
        return (f"num_key_value_heads={num_kv_heads} and parallel.sequence_parallel={degree}: one must divide the "
                "other (the key/value heads are split among the ranks, or repeated to one per rank)")
    return None


def kv_heads_on_wire(num_kv_heads: int, degree: int) -> int:
    """Key/value heads that go through the all-to-all: the model's, or one per rank when it has fewer."""
    return max(num_kv_heads, degree)


def state_options(shape: ModelShape, machine: Machine, layer_fwd_s: float, optimizer: str = "auto",
                  params: str = "auto", galore: Optional[GaloreSizing] = None,
                  sharding: Sharding = Sharding(), adapter: Optional[AdapterSizing] = None,
                  accumulation: int = 1) -> tuple[StateOption, ...]:
    """Every placement of optimizer state and weights the config allows (`auto` lets the MILP choose), with
    its GPU and tier bytes and its time costs. Weights off the GPU need the optimizer off it too. `accumulation`:
    micro-batches a step (with one, and one process, the gradients of a state on the GPU are counted from the
    backward that makes them: timeline.device_state_rows)."""
    if adapter is not None:
        return _adapter_state_options(shape, machine, optimizer, adapter, sharding)
    wb, p, layer_p, L = shape.layer.dtype_bytes, shape.params, shape.layer_params, shape.num_layers
    other_p = p - L * layer_p  # embeddings, LM head, final norm: always on the GPU
    if not machine.overlaps_transfers:  # the host's work and the drive's take their time from the compute
        layer_fwd_s = 0.0
    tiers = {t.name: t for t in machine.tiers}
    host_link = tiers.get("host")
    out = []
    for opt in (STATE_PLACES if optimizer == "auto" else (optimizer,)):
        for par in (STATE_PLACES if params == "auto" else (params,)):
            if par != "gpu" and opt == "gpu":
                continue
            if "nvme" in (opt, par) and "nvme" not in tiers:
                continue
            if (opt, par) != ("gpu", "gpu") and host_link is None:
                continue  # state on NVMe is stepped and staged in host memory too
            gpu = {
                # Streamed weights: two layers resident (in use + prefetched), ZeRO-Infinity style.
                "weights": (p if par == "gpu" else other_p + 2 * layer_p) * wb,
                # Off the GPU, each layer's gradients leave as soon as they are complete (Fuyou).
                "grads": (p if opt == "gpu" else other_p + 2 * layer_p) * wb,
                "optimizer": 2 * wb * p if opt == "gpu" else 0.0,  # torch AdamW: two moments in the weights' dtype
            }
            if galore is not None:
                if par != "gpu" or opt == "nvme":
                    continue  # GaLore: moments on the device or the host, weights on the device
                sized = galore.bytes(shape)
                gpu["grads"] = sized["grads"]
                gpu["optimizer"] = sized["optimizer"] if opt == "gpu" else sized["bases"]
                if opt == "cpu":  # the moments on the host; the CPU steps them, rank-r copies each way
                    elements = sized["moment_elements"]
                    # synchronous in the runtime (not overlapped yet): the CPU step and both copies are exposed
                    copies = elements * wb * (1 / host_link.from_gpu_bps + 1 / host_link.to_gpu_bps)
                    out.append(StateOption(opt, par, gpu, {"host": sized["moments"]},
                                           exposed_s=elements / machine.cpu_adam_params_per_s + copies))
                    continue
            host = {"cpu": HOST_OPTIMIZER_BYTES, "nvme": NVME_HOST_OPTIMIZER_BYTES}.get(opt, 0) * p
            if not sharding.optimizer:  # (a strategy's ZeRO-Offload has its own buffers, not these)
                host += optimizer_host_buffer_bytes(opt, other_p, layer_p, L, accumulation)
            nvme = NVME_OPTIMIZER_BYTES * p if opt == "nvme" else 0.0
            weights = L * layer_p * wb
            host += weights if par == "cpu" else 0.0
            nvme += weights if par == "nvme" else 0.0
            host += 2 * layer_p * wb if par == "nvme" else 0.0  # a layer's read and write stagings (offload/params.py)
            tier_bytes = {k: v for k, v in (("host", host), ("nvme", nvme)) if v}
            exposed = fwd = bwd_in = bwd_out = 0.0
            if opt == "gpu":
                exposed = 4 * wb * p * 2 / machine.hbm_bps  # read and write weights, grads, two moments
            else:
                cpu_step = p / machine.cpu_adam_params_per_s
                # Clipping needs every gradient first, so the updates run after backward, layer 0 first; each
                # layer's next forward waits for its own: the first layer's step is exposed, the rest overlaps.
                exposed = min(cpu_step, cpu_step / L + max(0.0, cpu_step - L * layer_fwd_s))
                bwd_out = layer_p * wb / host_link.from_gpu_bps
                if par == "gpu":
                    fwd = layer_p * wb / host_link.to_gpu_bps  # updated weights back before the layer's forward
                if opt == "nvme":
                    drive = tiers["nvme"]
                    io = NVME_OPTIMIZER_BYTES * p * (1 / drive.to_gpu_bps + 1 / drive.from_gpu_bps)
                    exposed += max(0.0, io - L * layer_fwd_s)
            if par != "gpu":
                link = tiers["host" if par == "cpu" else "nvme"]
                fwd = bwd_in = layer_p * wb / link.to_gpu_bps  # fetched for the forward, again for backward
            if sharding.optimizer:  # an offloaded optimizer shard (ZeRO-Offload) holds 1/world of the host state
                tier_bytes = {k: v / sharding.world for k, v in tier_bytes.items()}
            gpu = sharding.apply(gpu, layer_p * wb)
            exposed /= sharding.world if sharding.optimizer else 1  # each rank steps its shard
            rows = ()
            if opt != "gpu" and not (sharding.optimizer or sharding.grads or sharding.weights):
                rows, gpu = _off_gpu_state_rows(shape, par != "gpu")
            elif opt == "gpu" and galore is None and sharding.world == 1 and accumulation == 1:
                rows = _device_state_rows(shape)
            out.append(StateOption(opt, par, gpu, tier_bytes, exposed, fwd, bwd_in, bwd_out, rows))
    if not out:
        raise ValueError(f"no placement of memory.optimizer={optimizer} memory.params={params} is possible on a machine "
                         f"with tiers {', '.join(tiers) or 'none'}")
    return tuple(out)


def _device_state_rows(shape: ModelShape) -> tuple[float, ...]:
    """The state's GPU bytes per position with the optimizer on the GPU, one micro-batch, one process
    (timeline.device_state_rows)."""
    wb, L = shape.layer.dtype_bytes, shape.num_layers
    embedding = shape.vocab * shape.layer.hidden * wb
    head = embedding + shape.layer.hidden * wb  # the head's weight (the embeddings' when tied) and the final norm
    rows = device_state_rows(L, weights=shape.params * wb, moments=2 * wb * shape.params, head_grads=head,
                             embedding_grads=embedding, layer_grads=shape.layer_params * wb, tied=shape.tied_embeddings)
    return tuple(float(r) for r in rows)


def _off_gpu_state_rows(shape: ModelShape, streamed: bool) -> tuple[tuple[float, ...], dict[str, float]]:
    """The state's GPU bytes per position with the optimizer off the GPU (timeline.state_rows), and each part's
    peak over the step."""
    wb, L = shape.layer.dtype_bytes, shape.num_layers
    embedding = shape.vocab * shape.layer.hidden * wb
    head = embedding + shape.layer.hidden * wb  # the head's weight (the embeddings' when tied) and the final norm
    sizes = dict(rest_weights=(shape.params - L * shape.layer_params) * wb, layer_weights=shape.layer_params * wb,
                 streamed=streamed, head_grads=head, embedding_grads=embedding, layer_grads=shape.layer_params * wb,
                 tied=shape.tied_embeddings)
    total = state_rows(L, **sizes)
    weights = state_rows(L, **{**sizes, "head_grads": 0.0, "embedding_grads": 0.0, "layer_grads": 0.0})
    peaks = {"weights": max(weights), "grads": max(t - w for t, w in zip(total, weights)), "optimizer": 0.0}
    return tuple(float(t) for t in total), peaks


BATCH_TOKEN_BYTES = 24  # the micro-batch on the GPU: input ids, labels and positions, int64
LOSS_TOKEN_BYTES = 24  # the fused loss's per-token bookkeeping, with its temporaries


def head_bytes(shape: ModelShape, tokens: int, kernels: frozenset[str] = frozenset(),
               loss_chunk_tokens: Optional[int] = None, head_trains: bool = True,
               norm_chunk_tokens: Optional[int] = None) -> float:
    """GPU bytes of the LM head's step: the final norm's saved tensors, the loss's logits workspace and the head's
    weight gradient (the fused loss computes it, with the hidden states', during the forward). An optimizer off
    the GPU takes that gradient in its hook, so the state counts it only after the head (timeline.state_rows).
    `head_trains` False (adapters: the head is frozen): no weight gradient.
    `norm_chunk_tokens`: the activation runtime runs the final norm (offload/activations._FinalNormFunction): it
    saves its input alone, and its backward, that many tokens at a time, makes the input gradient beside the
    output's; the step's head is the larger of the loss's forward and that backward."""
    h, v, wb = shape.layer.hidden, shape.vocab, shape.layer.dtype_bytes
    weight_grad = 1 if head_trains else 0
    cast = wb if wb < 4 else 0  # the model-dtype copy of an fp32 buffer (an fp32 model has none: .to() is a no-op)
    if norm_chunk_tokens is None:  # final norm, as the layer's post norm: its input (stored once), rstd, normed
        # (stock only), output
        norm = tokens * (wb * h + 4 + (0 if "rmsnorm" in kernels else wb * h) + wb * h)
    else:  # its input and output
        norm = tokens * 2 * wb * h
    if loss_chunk_tokens:  # logits of one chunk (fp32, and the model dtype), grad_weight (fp32 + dtype), and per
        # token the fp32 loss, the label masks and the per-chunk counts (kernels/fused_ce.py); grad_hidden is written
        # over the norm's output (models/patch.py: overwrite_hidden), or, with autograd's norm, counted apart
        loss = (min(loss_chunk_tokens, tokens) * v * (4 + cast) + weight_grad * v * h * (4 + cast)
                + tokens * LOSS_TOKEN_BYTES + (tokens * h * wb if norm_chunk_tokens is None else 0))
    else:  # full logits in the model dtype, their fp32 copy and the fp32 softmax grad, the head's weight grad
        loss = tokens * v * (wb + 8) + weight_grad * v * h * wb
    if norm_chunk_tokens is None:
        return norm + loss
    # the norm's backward: its input, the output's gradient and the input's (written over the output's where the
    # fused loss put that in the output's own bytes), the head's weight gradient on its way to the optimizer, and
    # a chunk's recompute (fp32 in a bf16 model: the upcast input, its square, the normed input, their gradients)
    gradients = 1 if loss_chunk_tokens else 2
    backward = tokens * (1 + gradients) * wb * h + weight_grad * v * h * wb + min(norm_chunk_tokens, tokens) * h * 4 * 4
    return max(norm + loss, backward)


def all_to_all_bytes(shape: ModelShape, tokens: int, degree: int) -> tuple[float, float]:
    """Bytes one rank sends over the interconnect per layer under sequence parallelism (and receives as many),
    forward and backward: each all-to-all keeps 1/degree of its tensor and sends the rest."""
    if degree <= 1:
        return 0.0, 0.0
    wb, q = shape.layer.dtype_bytes, shape.q_dim
    kv = kv_heads_on_wire(shape.layer.num_kv_heads, degree) * shape.layer.head_dim
    share = tokens * wb * (degree - 1) / degree
    return share * (2 * q + 2 * kv), share * (4 * q + 4 * kv)


def chunk_tokens(tokens: int, chunks: int) -> int:
    """Tokens of the largest of a layer's chunks: the runtime cuts [0, tokens) at i * tokens // chunks
    (offload/activations.chunk_bounds), so chunks differ by at most a token; the plan sizes every chunk as the
    largest, so whichever chunks a decision moves fit their region."""
    return -(-tokens // chunks)


def layer_workspace(shape: ModelShape, tokens: int, chunks: int, saved: dict[str, float], sequence_parallel: int = 1,
                    trained_params: Optional[int] = None) -> tuple[float, float, float]:
    """Bytes the runtime holds while one layer runs, beyond the saved activations: (forward, backward while a
    chunk's graph runs, backward while a chunk's attention backward runs).

    forward:  the layer input and output and K, V of all tokens, and one chunk's: its input copy, q/k/v, the
              attention of its queries (its output and logsumexp, the fp32 merge of its key blocks and one
              block's output: offload/attention.attention_forward_chunk), its graph's transients. Under sequence
              parallelism q of the shard too, in two passes (below);
    backward: the output gradient (the input gradient is written over it chunk by chunk, from the last: a chunk's
              output gradient is read by its own backward alone; offload/activations.py), K and V of all tokens
              and their gradients (fp32 when the model is bf16/fp16), the parameter gradients summed in fp32 and
              cast, and either one chunk's
              transients (its graph, run or recomputed, and their gradients; the recomputed chunk adds to it in
              the rows) or, between a chunk's post and pre graphs, with neither alive, the attention backward's
              own buffers (inventory.attention_backward_workspace: a chunk's queries against one block of
              earlier keys, as long as a chunk, the kernel's own buffers included; under sequence parallelism,
              this rank's heads over the whole sequence at once).
    The dry run measures them (trainer/dry_run.py)."""
    L = shape.layer
    wb, h, q, kv = L.dtype_bytes, L.hidden, shape.q_dim, shape.kv_dim
    acc = 4 if wb < 4 else wb
    chunk = chunk_tokens(tokens, chunks)
    transient = chunk * (saved["pre"] + saved["post"])  # a chunk's graph and its gradients, about its saved size
    forward = (tokens * (2 * h * wb + 2 * kv * wb)
               + chunk * (h * wb + (q + 2 * kv) * wb + saved["attn"] + q * (wb + 4))) + transient
    # (trained_params: of a layer, where not all of it trains: adapters)
    grads = (shape.layer_params if trained_params is None else trained_params) * (4 + (wb if wb < 4 else 0))
    backward = tokens * (h * wb + 2 * kv * wb + 2 * kv * acc) + grads
    if sequence_parallel == 1:  # the earlier keys in blocks of a chunk's length (offload/attention.py)
        attention = sum(attention_backward_workspace(L, min(tokens - chunk, chunk), chunk).values())
    if sequence_parallel > 1:  # offload/ulysses.py, beside the buffers above
        kvw = kv_heads_on_wire(L.num_kv_heads, sequence_parallel) * L.head_dim
        heads = replace(L, num_heads=L.num_heads // sequence_parallel, num_kv_heads=kvw // L.head_dim // sequence_parallel)
        attention = sum(attention_backward_workspace(heads, min(tokens * sequence_parallel - chunk, chunk), chunk).values())
        # forward, first pass (every chunk's pre part): the input, q, K and V of the shard, then K and V to the head
        # layout, one at a time (the repeated heads, send, receive and reordered copies beside the first's result);
        # second pass (a chunk's attention and post part): the input, the output, q of the shard and K, V in the
        # head layout, and the chunk's input copy, q and output through the all-to-alls (send, receive, reordered
        # copies), the attention's fp32 merge, the stashed output
        first = tokens * wb * (h + q + 2 * kv + 5 * kvw)
        second = tokens * wb * (2 * h + q + 2 * kvw) + chunk * (h * wb + 8 * q * wb + 4 * q + saved["attn"])
        forward = max(first, second) + transient
        # backward: K and V in the head layout (their local copies and send buffers while they go) and their
        # gradient sums there, dq of the shard, dk and dv brought back; a chunk's output gradient, q and output
        # in both layouts with their send buffers, and its dq
        backward += tokens * (2 * (kvw - kv) * (wb + acc) + q * wb + 2 * kvw * wb + 2 * kv * wb) \
            + chunk * q * (8 * wb + acc)
    return forward, backward + transient, backward + attention


def build_problem(
    shape: ModelShape,
    tokens: int,
    machine: Machine,
    budget_bytes: Optional[float] = None,
    chunks: int = 16,
    optimizer: str = "gpu",
    params: str = "gpu",
    loss_chunk_tokens: Optional[int] = None,
    kernels: frozenset[str] = frozenset(),
    prefetch_depth: int = 1,
    offload_activations: bool = True,
    checkpointed: bool = False,
    count_activations: bool = True,
    galore: Optional[GaloreSizing] = None,
    sharding: Sharding = Sharding(),
    sequence_parallel: int = 1,
    adapter: Optional[AdapterSizing] = None,
    accumulation: int = 1,
) -> Problem:
    """The cost model: FLOPs over achieved throughput, bytes from the runtime's activation inventory.

    Without the activation runtime (offload_activations=False) autograd keeps the activations: all of them, or with
    `checkpointed` (transformers' gradient checkpointing) each layer's input and one layer recomputed at a time;
    count_activations=False leaves them out of the rows altogether (placing the state when they cannot fit).

    sequence_parallel=P: `tokens` is this rank's shard of a sequence P times as long. Attention runs over the
    whole sequence for 1/P of the heads; its all-to-alls (q, k, v and the output forward; the output, its
    gradient, q, k, v and back dq, dk, dv backward) take the interconnect, on the compute stream, and their
    buffers add to the layer's workspace."""
    kernels = frozenset(kernels)
    saved = class_bytes_per_token(shape.layer, kernels)
    if adapter is not None:
        added = adapter.saved_bytes_per_token(shape)
        saved = {c: b + added.get(c, 0.0) for c, b in saved.items()}
    extra_workspace = 0.0
    if not offload_activations and checkpointed:  # the checkpoint is the layer input in the model dtype
        extra_workspace = sum(saved[c] for c in CLASSES) * tokens  # the one layer being recomputed
        saved = {**dict.fromkeys(CLASSES, 0.0), "input": float(shape.layer.hidden * shape.layer.dtype_bytes),
                 "shared": saved["shared"]}
    if not count_activations:
        saved = {**dict.fromkeys(CLASSES, 0.0), "shared": saved["shared"]}
    if chunks < 1 or tokens < chunks:
        raise ValueError(f"chunks must be in 1..tokens, got {chunks} for {tokens} tokens")
    mm = machine.bf16_flops * machine.matmul_efficiency
    attn = machine.bf16_flops * machine.attention_efficiency
    # Causal attention: QK^T and AV over half the (s x s) square.
    P = sequence_parallel
    attn_fwd_s = 2 * tokens * tokens * P * shape.q_dim / attn  # this rank's heads over all P x tokens positions
    pre_fwd_s = 2 * tokens * shape.pre_matmul_params / mm
    post_fwd_s = 2 * tokens * shape.post_matmul_params / mm
    a2a_fwd_s, a2a_bwd_s = (b / machine.interconnect_bps for b in all_to_all_bytes(shape, tokens, P))
    layer_fwd_s = pre_fwd_s + attn_fwd_s + post_fwd_s + a2a_fwd_s
    layer_bwd_s = 2 * (pre_fwd_s + post_fwd_s) + 2.5 * attn_fwd_s + a2a_bwd_s  # flash backward ~2.5x its forward
    head_s = 3 * 2 * tokens * shape.layer.hidden * shape.vocab / mm
    chunk = chunk_tokens(tokens, chunks)
    forward_phase, chunk_phase, attention_phase = layer_workspace(
        shape, tokens, chunks, saved, P, adapter.layer_params(shape) if adapter is not None else None)
    if adapter is not None:  # a 4-bit matrix de-quantized for its matmul (not in the attention backward)
        forward_phase, chunk_phase = (b + adapter.dequantized_bytes(shape) for b in (forward_phase, chunk_phase))
    return Problem(
        num_layers=shape.num_layers,
        chunks=chunks,
        chunk_bytes={c: saved[c] * chunk for c in CLASSES},
        # A dropped pre chunk is recomputed twice: its keys and values (no q) for the attention backward of every
        # token, then whole with its graph for its own backward (offload/activations.py).
        # (Under sequence parallelism the queries are recomputed with them: the first pass is whole.)
        recompute_s={"pre": pre_fwd_s * (2 if P > 1 else 1 + 2 * shape.kv_dim / (shape.q_dim + 2 * shape.kv_dim))
                            * machine.pre_recompute_factor / chunks,
                     "post": post_fwd_s * machine.post_recompute_factor / chunks},
        all_or_nothing=("attn",),
        layer_fwd_s=layer_fwd_s,
        layer_bwd_s=layer_bwd_s,
        head_s=head_s,
        fixed_bytes={"rope": saved["shared"] * tokens, "batch": BATCH_TOKEN_BYTES * tokens},
        layer_workspace_bytes=chunk_phase + extra_workspace,
        attention_phase_bytes=attention_phase + extra_workspace,
        forward_workspace_bytes=forward_phase + extra_workspace,
        head_bytes=head_bytes(shape, tokens, kernels, loss_chunk_tokens,
                              head_trains=adapter is None or adapter.saved_params(shape)[3],
                              norm_chunk_tokens=chunk_tokens(tokens, chunks) if offload_activations else None),
        budget_bytes=budget_bytes if budget_bytes is not None else machine.gpu_bytes,
        tiers=machine.tiers,
        overlap=machine.overlaps_transfers,
        state_options=state_options(shape, machine, layer_fwd_s, optimizer, params, galore, sharding, adapter,
                                    accumulation),
        prefetch_depth=prefetch_depth,
        offload_activations=offload_activations,
        meta={"tokens": tokens, "machine": machine.name, "params": shape.params, "kernels": sorted(kernels),
              **({"world": sharding.world, "sharded": [k for k in ("optimizer", "grads", "weights") if getattr(sharding, k)]}
                 if sharding.world > 1 else {}),
              **({"sequence_parallel": P, "sequence_tokens": tokens * P} if P > 1 else {}),
              **({"adapter": [f"{'qlora' if adapter.quantized else 'lora'} rank {adapter.rank}", *adapter.targets,
                              *(f"save {s}" for s in adapter.saved)]}
                 if adapter is not None else {})},
    )
