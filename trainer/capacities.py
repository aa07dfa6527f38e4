"""What a run may spend: the GPU budget and each tier off it, from the live machine (`longtune train`) or from a
machine profile (`longtune plan`), and the profile itself.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil

from longtune.planner.problem import Machine, ProfileError, ranks_per_node

from .config import Config, ConfigError

GB = 1e9
# memory.budget_gb=auto on a GPU: the free device memory less this share (at least AUTO_MARGIN_MIN_GB) for
# the CUDA context, the allocator's rounding and fragmentation, and what the plan does not model.
AUTO_MARGIN_SHARE, AUTO_MARGIN_MIN_GB = 0.05, 1.0


@dataclass
class Capacities:
    """Bytes a run may use: the GPU budget, and each tier off it (None: the machine profile's figure)."""

    gpu: float
    host: Optional[float] = None
    cxl: Optional[float] = None
    nvme: Optional[float] = None


def load_machine(name_or_path: str) -> Machine:
    try:
        return Machine.load(name_or_path)
    except FileNotFoundError as e:
        raise ConfigError(f"memory.machine: {e}") from None
    except ProfileError as e:
        raise ConfigError(f"memory.machine: {e}") from None


def profile_capacities(cfg: Config, machine: Machine, world: int = 1) -> Capacities:
    """What `longtune plan` spends per rank: memory.budget_gb (else the profile's GPU), memory.tiers (per rank) over
    the profile's tiers, which are a node's: shared by the ranks on it (up to the profile's gpus_per_node)."""
    t, budget = cfg.memory.tiers, cfg.memory.budget_gb
    gpu = budget * GB if isinstance(budget, (int, float)) else machine.gpu_bytes
    sharing = ranks_per_node(machine, world)
    profile = {tier.name: tier.capacity_bytes / sharing for tier in machine.tiers}
    return Capacities(gpu, *(x * GB if x is not None else profile.get(name)
                             for name, x in (("host", t.host_gb), ("cxl", t.cxl_gb), ("nvme", t.nvme_gb))))


def live_capacities(cfg: Config, device) -> Capacities:
    """What `longtune train` may spend on this machine now: memory.budget_gb (auto: the free device memory less
    the margin), memory.tiers where set, else what is free (host RAM, CXL nodes, the disk under nvme_path)."""
    import torch

    t, budget = cfg.memory.tiers, cfg.memory.budget_gb
    if device.type == "cuda":
        free = float(torch.cuda.mem_get_info(device)[0])
    else:  # the CPU is the device: its memory is the "GPU" budget
        free = float(psutil.virtual_memory().available)
    if budget == "auto":
        gpu = free - max(AUTO_MARGIN_SHARE * free, AUTO_MARGIN_MIN_GB * GB)
    else:
        gpu = budget * GB if budget is not None else free
    local = _local_ranks()  # the ranks on this machine share what is free on it
    host = t.host_gb * GB if t.host_gb is not None else float(psutil.virtual_memory().available) / local
    cxl = t.cxl_gb * GB if t.cxl_gb is not None else _cxl_free() / local
    nvme = 0.0
    if cfg.memory.nvme_path:
        nvme = t.nvme_gb * GB if t.nvme_gb is not None else \
            float(shutil.disk_usage(_existing_parent(cfg.memory.nvme_path)).free) / local
    return Capacities(gpu, host, cxl, nvme)


def _local_ranks() -> int:
    import os

    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _cxl_free() -> float:
    from longtune.offload.numa import cxl_nodes, read_nodes

    try:
        return float(sum(n.free_bytes for n in cxl_nodes(read_nodes())))
    except OSError:
        return 0.0


def _existing_parent(path: str) -> Path:
    p = Path(path).expanduser().absolute()
    while not p.exists():
        p = p.parent
    return p
