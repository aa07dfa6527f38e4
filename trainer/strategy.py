"""The interface every parallel strategy implements (parallel.py: single, DDP, FSDP2 and how one is chosen;
deepspeed_strategy.py: DeepSpeed ZeRO), and what it does for one process and for DDP-style ranks.

Its own module so that the DeepSpeed strategy can extend it while parallel.py builds either: parallel.py
imports deepspeed_strategy.py, which imports this, never parallel.py.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .ranks import Ranks


class Strategy:
    """One process, or data parallel ranks that all-reduce every gradient themselves (see DDP)."""

    name = "single"

    def __init__(self, cfg: Config, ranks: Ranks, device: torch.device):
        self.cfg, self.ranks, self.device = cfg, ranks, device
        self.model: Optional[nn.Module] = None
        self.runtime = None

    def shard(self, model: nn.Module) -> None:
        """Before the optimizer exists: what changes the parameters themselves."""

    def wrap(self, model: nn.Module, runtime) -> nn.Module:
        """The module the step calls (a wrapper for DDP, an engine for DeepSpeed)."""
        self.model, self.runtime = model, runtime
        return model

    @property
    def optimizer(self):
        return self.runtime.optimizer

    def micro_batch(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.ranks.world if self.ranks.world > 1 else loss).backward()

    def clip_and_step(self):
        return self.runtime.clip_and_step()

    def zero_grad(self) -> None:
        self.runtime.zero_grad()

    def parts(self):
        """How this strategy's weights and optimizer state go into a checkpoint."""
        return ckpt.TorchParts(self.model, self.optimizer, main=self.ranks.main, materialized=self.runtime.materialized)

    def check_resume(self, state: ckpt.TrainState, path) -> None:
        kind = ckpt.checkpoint_format(path)
        if kind == "deepspeed":
            raise ConfigError(f"checkpoint {path} was written by DeepSpeed ZeRO (parallel.strategy=deepspeed): resume "
                              f"it with that strategy, or export it (longtune export) and start from the export")

    def close(self) -> None:
        pass
