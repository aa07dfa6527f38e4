"""The planning problem as plain numbers: layer sizes and times, tiers, the GPU budget.

Nothing here imports torch: `longtune plan` builds a Problem from a config alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from .inventory import LayerShape, class_bytes_per_token

# Activation classes of a decoder layer (see inventory.py), in the order they are made.
CLASSES = ("input", "attn", "pre", "post")
GB = 1e9


@dataclass(frozen=True)
class Tier:
    """Memory off the GPU: capacity, and bandwidth each way over the link to the GPU."""

    name: str
    capacity_bytes: float
    to_gpu_bps: float
    from_gpu_bps: float


@dataclass(frozen=True)
class Machine:
    name: str
    gpu_bytes: float
    bf16_flops: float
    matmul_efficiency: float
    attention_efficiency: float
    tiers: tuple[Tier, ...]

    @classmethod
    def from_dict(cls, d: dict) -> "Machine":
        gpu = d["gpu"]
        tiers = tuple(
            Tier(name, t["capacity_gb"] * GB, t["to_gpu_gbps"] * GB, t["from_gpu_gbps"] * GB)
            for name, t in (d.get("tiers") or {}).items()
            if t["capacity_gb"] > 0
        )
        return cls(d["name"], gpu["memory_gb"] * GB, gpu["bf16_tflops"] * 1e12,
                   gpu["matmul_efficiency"], gpu["attention_efficiency"], tiers)

    @classmethod
    def load(cls, name_or_path: str) -> "Machine":
        """A machine profile YAML file, or the name of a bundled one (h100-pcie5, h200-pcie5)."""
        path = Path(name_or_path)
        if not path.is_file():
            bundled = resources.files("longtune.planner") / "machines" / f"{name_or_path}.yaml"
            if not bundled.is_file():
                raise FileNotFoundError(f"machine profile {name_or_path} not found; bundled: {', '.join(bundled_machines())}")
            path = Path(str(bundled))
        return cls.from_dict(yaml.safe_load(path.read_text()))


def bundled_machines() -> list[str]:
    folder = resources.files("longtune.planner") / "machines"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


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
    fixed_bytes: dict[str, float]  # weights, grads, optimizer state on the GPU, ...
    layer_workspace_bytes: float  # transient of one layer's forward/backward (activation grads)
    head_bytes: float  # logits / loss workspace
    budget_bytes: float
    tiers: tuple[Tier, ...]
    # Each second of link time (hidden or not) adds this fraction of a second to the objective,
    # so ties go to keeping over moving, and to the faster tier over the slower one.
    transfer_penalty: float = 1e-6
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def fixed_total(self) -> float:
        return sum(self.fixed_bytes.values())

    def with_budget(self, budget_bytes: float) -> "Problem":
        return replace(self, budget_bytes=budget_bytes)


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

    @property
    def layer_params(self) -> int:
        return self.pre_matmul_params + self.post_matmul_params + 2 * self.layer.hidden

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.layer.hidden * (1 if self.tied_embeddings else 2)
        return self.num_layers * self.layer_params + embeddings + self.layer.hidden


def build_problem(
    shape: ModelShape,
    tokens: int,
    machine: Machine,
    budget_bytes: Optional[float] = None,
    chunks: int = 16,
    optimizer_on_gpu: bool = True,
    params_on_gpu: bool = True,
    optimizer_bytes_per_param: float = 8,
    loss_chunk_tokens: Optional[int] = None,
) -> Problem:
    """The cost model: FLOPs over achieved throughput, bytes from the activation inventory."""
    saved = class_bytes_per_token(shape.layer)
    if chunks < 1 or tokens < chunks:
        raise ValueError(f"chunks must be in 1..tokens, got {chunks} for {tokens} tokens")
    mm = machine.bf16_flops * machine.matmul_efficiency
    attn = machine.bf16_flops * machine.attention_efficiency
    # Causal attention: QK^T and AV over half the (s x s) square.
    attn_fwd_s = 2 * tokens * tokens * shape.q_dim / attn
    pre_fwd_s = 2 * tokens * shape.pre_matmul_params / mm
    post_fwd_s = 2 * tokens * shape.post_matmul_params / mm
    layer_fwd_s = pre_fwd_s + attn_fwd_s + post_fwd_s
    layer_bwd_s = 2 * (pre_fwd_s + post_fwd_s) + 2.5 * attn_fwd_s  # flash backward ~2.5x its forward
    h, wb = shape.layer.hidden, shape.layer.dtype_bytes
    head_s = 3 * 2 * tokens * h * shape.vocab / mm
    p, layer_p = shape.params, shape.layer_params
    other_p = p - shape.num_layers * layer_p  # embeddings, LM head, final norm
    # Streamed parameters: two layers resident (in use + prefetched), ZeRO-Infinity style.
    weights_p = p if params_on_gpu else other_p + 2 * layer_p
    # With the optimizer off the GPU, each layer's grads leave as soon as they are complete (Fuyou).
    grads_p = p if optimizer_on_gpu else other_p + 2 * layer_p
    fixed = {
        "weights": weights_p * wb,
        "grads": grads_p * wb,
        "optimizer": p * optimizer_bytes_per_param if optimizer_on_gpu else 0.0,
        "rope": saved["shared"] * tokens,
    }
    if loss_chunk_tokens:  # chunked loss: logits of one chunk (model dtype + fp32) and an fp32 grad_weight
        head_bytes = min(loss_chunk_tokens, tokens) * shape.vocab * (wb + 8) + shape.vocab * h * 4
    else:  # full logits in the model dtype, their fp32 copy and the fp32 softmax grad
        head_bytes = tokens * shape.vocab * (wb + 8)
    chunk = tokens / chunks
    return Problem(
        num_layers=shape.num_layers,
        chunks=chunks,
        chunk_bytes={c: saved[c] * chunk for c in CLASSES},
        recompute_s={"pre": pre_fwd_s / chunks, "post": post_fwd_s / chunks},
        all_or_nothing=("attn",),
        layer_fwd_s=layer_fwd_s,
        layer_bwd_s=layer_bwd_s,
        head_s=head_s,
        fixed_bytes=fixed,
        # Backward runs the token-wise parts chunk by chunk: it holds the grads of the layer's output
        # and input ([s, h] each), two [chunk, I] MLP grads, and K/V of all tokens for the attention backward.
        layer_workspace_bytes=(tokens * 2 * h + 2 * chunk * shape.layer.intermediate + tokens * 2 * shape.kv_dim) * wb,
        head_bytes=head_bytes,
        budget_bytes=budget_bytes if budget_bytes is not None else machine.gpu_bytes,
        tiers=machine.tiers,
        meta={"tokens": tokens, "machine": machine.name, "params": p},
    )

