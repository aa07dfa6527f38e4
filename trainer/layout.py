"""The parallel layout of a run, in one object: how many processes, which strategy holds the state (auto
resolved), the ZeRO stage, and how the ranks divide into data-parallel replicas x sequence-parallel groups.

    layout = ParallelLayout.of(cfg, world, rank)
    layout.strategy, layout.sharding, layout.dp_rank, layout.dp_world, layout.sp_rank

The planner sizes one rank by `layout.sharding`; the strategy (parallel.py) is built from `layout.strategy`;
sequence parallelism (sequence_parallel.py) forms its groups from `layout.sequence` and reads its shard from
`layout.sp_rank`; the data loader takes `layout.dp_rank` of `layout.dp_world`. Ranks g*P .. g*P + P - 1 share
a sequence (P = layout.sequence).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from longtune.planner.problem import Sharding

from .config import Config, ConfigError


@dataclass(frozen=True)
class ParallelLayout:
    world: int  # processes
    rank: int
    strategy: str  # single, ddp, fsdp2, deepspeed (parallel.strategy with auto resolved)
    zero_stage: int  # the ZeRO stage DeepSpeed runs (its JSON's, else parallel.zero_stage)
    sequence: int = 1  # P: ranks per sequence (parallel.sequence_parallel)

    @classmethod
    def of(cls, cfg: Config, world: int, rank: int = 0) -> "ParallelLayout":
        s = cfg.parallel.strategy
        strategy = ("single" if world == 1 else "ddp") if s == "auto" else s
        zero = _zero_stage(cfg) if strategy == "deepspeed" else cfg.parallel.zero_stage
        return cls(world, rank, strategy, zero, cfg.parallel.sequence_parallel)

    @property
    def dp_world(self) -> int:  # data-parallel replicas (sequence groups)
        return max(1, self.world // self.sequence)

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sequence

    @property
    def sp_rank(self) -> int:  # this rank's shard of its group's sequences
        return self.rank % self.sequence

    @property
    def strategy_owns_state(self) -> bool:
        """FSDP2 / DeepSpeed hold the optimizer state and weights (sharded, or ZeRO-Offload's), not our runtime."""
        return self.strategy in ("fsdp2", "deepspeed")

    @property
    def sharding(self) -> Sharding:
        """What each rank keeps 1/world of (the planner sizes one rank)."""
        if self.world == 1 or self.strategy in ("single", "ddp"):
            return Sharding(self.world)
        stage = 3 if self.strategy == "fsdp2" else self.zero_stage
        return Sharding(self.world, optimizer=stage >= 1, grads=stage >= 2, weights=stage >= 3)


def _zero_stage(cfg: Config) -> int:
    """The ZeRO stage DeepSpeed will run: the user's JSON's (parallel.deepspeed_config), else parallel.zero_stage."""
    path = cfg.parallel.deepspeed_config
    if path is None:
        return cfg.parallel.zero_stage
    try:
        stage = json.loads(Path(path).expanduser().read_text()).get("zero_optimization", {}).get("stage", 0)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise ConfigError(f"parallel.deepspeed_config: {path} is not a readable DeepSpeed JSON object: {e}") from None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.deepspeed_config: {path} has zero_optimization.stage={stage!r}; ZeRO stages are 0-3")
    return stage
