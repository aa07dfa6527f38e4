"""Who this process is in a multi-process run, and the few collectives the trainer itself needs.

The process group is set up by the launcher (launch/distributed.py: torchrun's environment, or Ray Train's own
setup); here it is only read. With one process every call is a local no-op, so the single-process path runs
the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def device_type(want: str = "auto") -> str:
    """run.device resolved: "cuda" or "cpu"."""
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device=cuda, but torch sees no GPU (a CPU build of torch, or no visible device)")
    return "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"


def gpus_short(processes: int, gpus: int) -> str:
    """Why `processes` ranks on this machine cannot each have a GPU of its own ('' when they can)."""
    if processes <= gpus:
        return ""
    return (f"{processes} processes on this machine take a GPU each (cuda:LOCAL_RANK) and it has {gpus}: run "
            f"{gpus or 'no'} process(es) per machine, or run.device=cpu for processes on the CPU (gloo)")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @staticmethod
    def current() -> "Ranks":
        if not (dist.is_available() and dist.is_initialized()):
            return Ranks()
        import os

        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        """Rank 0 writes the run's shared files, metrics and checkpoint markers."""
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a new tensor, on value's device)."""
        if self.world == 1:
            return value.detach().clone()
        out = value.detach().to(_comm_device(), copy=True)
        dist.all_reduce(out)
        return out.to(value.device)

    def sum_int(self, value: int) -> int:
        return int(self.sum(torch.tensor(value, dtype=torch.int64)).item()) if self.world > 1 else value

    def all_ok(self, ok: bool) -> bool:
        """True when every rank says ok: the others learn of one rank's failure instead of waiting for it."""
        if self.world == 1:
            return ok
        flag = torch.tensor(1 if ok else 0, dtype=torch.int64, device=_comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def from_main(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a decision one process makes: which checkpoint, which temp folder)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _comm_device() -> torch.device:
    """NCCL reduces tensors on the GPU, gloo on the host."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
