"""Config -> offload runtime: where optimizer state and weights live, checked against what the tiers hold."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil
import torch

from .config import Config, ConfigError

GB = 1e9
# Host bytes per parameter with the optimizer off the GPU: fp32 master, two moments, the fp32 gradient sum.
HOST_OPTIMIZER_BYTES = 16
NVME_OPTIMIZER_BYTES = 12  # master and moments on the drive; the gradient sum stays on the host
GPU_SHARE_FOR_STATE = 0.5  # `auto` keeps state on the GPU only while it leaves half for activations


@dataclass
class Capacities:
    gpu: float
    host: float
    cxl: float
    nvme: float


def capacities(cfg: Config, device: torch.device) -> Capacities:
    """What each tier may hold: the config's `memory.tiers` where set, else what this machine has free now."""
    t = cfg.memory.tiers
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        gpu = cfg.memory.budget_gb * GB if cfg.memory.budget_gb else free
    else:  # the CPU is the device: its memory is the "GPU" budget
        gpu = cfg.memory.budget_gb * GB if cfg.memory.budget_gb else psutil.virtual_memory().available
    host = t.host_gb * GB if t.host_gb is not None else psutil.virtual_memory().available
    cxl = t.cxl_gb * GB if t.cxl_gb is not None else _cxl_free()
    nvme = 0.0
    if cfg.memory.nvme_path:
        nvme = t.nvme_gb * GB if t.nvme_gb is not None else shutil.disk_usage(_existing_parent(cfg.memory.nvme_path)).free
    return Capacities(gpu, host, cxl, nvme)


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


def resolve_placement(cfg: Config, n_params: int, weight_bytes: int, caps: Capacities) -> tuple[str, str]:
    """(optimizer tier, params tier) with `auto` decided and each tier's capacity checked."""
    mem = cfg.memory
    adam_gpu = 4 * n_params * weight_bytes  # weights, grads, two moments in the weights' dtype
    optimizer, params = mem.optimizer, mem.params
    if optimizer == "auto":
        off_host = (caps.host + caps.cxl) >= HOST_OPTIMIZER_BYTES * n_params
        optimizer = "gpu" if adam_gpu <= GPU_SHARE_FOR_STATE * caps.gpu else ("cpu" if off_host else "nvme")
    if params == "auto":
        fits = (2 * n_params * weight_bytes <= GPU_SHARE_FOR_STATE * caps.gpu) or optimizer == "gpu"
        params = "gpu" if fits else ("cpu" if caps.host + caps.cxl >= n_params * weight_bytes else "nvme")
        if optimizer == "gpu" and params != "gpu":
            optimizer = "cpu"
    host_need = (HOST_OPTIMIZER_BYTES if optimizer == "cpu" else 4 if optimizer == "nvme" else 0) * n_params
    host_need += n_params * weight_bytes if params == "cpu" else 0
    nvme_need = (NVME_OPTIMIZER_BYTES * n_params if optimizer == "nvme" else 0) + (n_params * weight_bytes if params == "nvme" else 0)
    _need("host", host_need, caps.host + caps.cxl, optimizer, params)
    _need("nvme", nvme_need, caps.nvme, optimizer, params)
    return optimizer, params


def early_placement(cfg: Config, device: torch.device) -> Optional[tuple[str, str]]:
    """The placement from the config's architecture alone, so an impossible one fails before a weight is loaded
    and `auto` is decided on the memory free before the model takes its share. None: sized after loading."""
    if cfg.memory.optimizer == "gpu" and cfg.memory.params == "gpu":
        return "gpu", "gpu"
    from longtune.planner.problem import ModelShape

    from .planning import hf_config_dict

    try:
        shape = ModelShape.from_hf_config(hf_config_dict(cfg), cfg.model.dtype)
    except (KeyError, ValueError, TypeError):
        return None  # an architecture the planner cannot size: checked once the model is built
    return resolve_placement(cfg, shape.params, shape.layer.dtype_bytes, capacities(cfg, device))


def _need(tier: str, need: float, have: float, optimizer: str, params: str) -> None:
    if need > have:
        raise ConfigError(
            f"memory.optimizer={optimizer} memory.params={params} needs {need / GB:.1f} GB on the {tier} tier, "
            f"which holds {have / GB:.1f} GB: {(need - have) / GB:.1f} GB missing "
            f"(raise memory.tiers.{tier}_gb, or move state to {'nvme' if tier == 'host' else 'host'})")


@dataclass
class Offload:
    """The offload runtime of one run; every member is None where that state stays on the GPU."""

    optimizer_tier: str = "gpu"
    params_tier: str = "gpu"
    optimizer: Optional[object] = None  # OffloadedAdamW
    streamer: Optional[object] = None  # ParamStreamer
    store: Optional[object] = None  # NvmeStore
    notes: list[str] = field(default_factory=list)

    def saving(self):
        return self.streamer.saving() if self.streamer is not None else contextlib.nullcontext()

    def traffic(self) -> dict[str, float]:
        """Running totals: GB moved to the device and to the host, GB read and written on NVMe, and seconds the
        training thread waited for an update or a fetch (the part of the movers' time not hidden by compute)."""
        opt, streamer, store = self.optimizer, self.streamer, self.store
        if opt is None:
            return {}
        totals = {"to_device_gb": (opt.bytes_to_device + (streamer.bytes_fetched if streamer else 0)) / GB,
                  "to_host_gb": opt.bytes_to_host / GB,
                  "offload_wait_s": opt.wait_s + (streamer.wait_s if streamer else 0.0)}
        if store is not None:
            totals |= {"nvme_read_gb": store.bytes_read / GB, "nvme_write_gb": store.bytes_written / GB}
        return totals

    def materialized(self):
        """Every weight reachable through the model (for checkpoint save and load)."""
        return self.streamer.materialized() if self.streamer is not None else contextlib.nullcontext()

    def close(self) -> None:
        """Stop the movers and remove the NVMe scratch files, whatever fails on the way."""
        errors = []
        for part in (self.optimizer, self.streamer, self.store):
            if part is not None:
                try:
                    part.close()
                except Exception as e:
                    errors.append(e)
        if errors:
            raise errors[0]


def build_offload(cfg: Config, model: torch.nn.Module, device: torch.device, n_params: int,
                  placement: Optional[tuple[str, str]] = None) -> Offload:
    """Move the model to `device`, except what the config sends elsewhere, and start the movers."""
    weight_bytes = next(model.parameters()).element_size()
    optimizer_tier, params_tier = placement or resolve_placement(cfg, n_params, weight_bytes, capacities(cfg, device))
    off = Offload(optimizer_tier, params_tier)
    if optimizer_tier == "gpu":
        model.to(device)
        return off
    from longtune.offload.cpu_adam import CpuAdamW
    from longtune.offload.optimizer import OffloadedAdamW
    from longtune.offload.params import ParamStreamer

    mem = cfg.memory
    if "nvme" in (optimizer_tier, params_tier):
        from longtune.offload.nvme import NvmeError, NvmeStore

        try:
            off.store = NvmeStore(mem.nvme_path, checksum=mem.nvme_checksum, backend=mem.nvme_backend)
        except NvmeError as e:
            raise ConfigError(f"memory.nvme_path: {e}") from None
        off.notes.append(f"nvme tier: {off.store.folder} ({off.store.backend_name}, "
                         f"{'O_DIRECT' if off.store.direct_io else 'buffered'}, checksums {'on' if mem.nvme_checksum else 'off'})")
    numa_optimizer, numa_weights = _numa_placement(cfg, n_params, weight_bytes, params_tier, off.notes)
    if params_tier == "gpu":
        model.to(device)
    t, o = cfg.train, cfg.optim
    cpu_adam = CpuAdamW(mem.cpu_adam)
    # Built while every weight is still in the model: the master copy starts from them.
    off.optimizer = OffloadedAdamW(model, lr=t.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                   clip_grad_norm=t.clip_grad_norm, tier=optimizer_tier, nvme_store=off.store,
                                   cpu_adam=cpu_adam, device=device, **numa_optimizer)
    if params_tier != "gpu":
        off.streamer = ParamStreamer(model, device, tier="cpu" if params_tier == "cpu" else "nvme", nvme_store=off.store, **numa_weights)
        off.optimizer.set_weight_writers(off.streamer.writers())
        off.streamer.wait_update = off.optimizer.wait_group
    off.notes.append(f"optimizer on {optimizer_tier} ({cpu_adam.backend_name} AdamW, stepped per layer during backward)"
                     + (f"; decoder weights streamed from {params_tier}" if params_tier != "gpu" else ""))
    return off


def _numa_placement(cfg: Config, n_params: int, weight_bytes: int, params_tier: str, notes: list[str]) -> tuple[dict, dict]:
    """NUMA binding of the optimizer's and the weights' host pools, by the CXL-aware policy (Liaw & Chen).

    fp32 optimizer state prefers local DRAM; the weights (model dtype) may go to CXL; a pool that straddles
    the local budget is interleaved over local + CXL nodes. With no CXL node both pools are bound to the
    local node (a real mbind) and the CXL tier is emulated.
    """
    # numa is looked up at call time, so a test can stand a fake sysfs tree in for read_nodes.
    from longtune.offload.numa import cxl_nodes, local_nodes, read_nodes
    from longtune.offload.placement import PlacementRequest, TensorKind, place

    try:
        nodes = read_nodes()
    except OSError:
        return {}, {}
    local, cxl = local_nodes(nodes), cxl_nodes(nodes)
    if not local:
        return {}, {}
    if not cxl:
        notes.append(f"host tier bound to NUMA node {local[0].id}; no CXL node: the cxl tier is emulated on node {local[0].id}")
        return {"numa_nodes": [local[0].id]}, {"numa_nodes": [local[0].id]}
    budget = cfg.memory.tiers.host_gb * GB if cfg.memory.tiers.host_gb is not None else sum(n.free_bytes for n in local)
    requests = [PlacementRequest("optimizer", HOST_OPTIMIZER_BYTES * n_params, TensorKind.FP32_MOMENTUM)]
    if params_tier == "cpu":
        requests.append(PlacementRequest("weights", weight_bytes * n_params, TensorKind.BF16_WEIGHT))
    try:
        placements = place(requests, nodes, int(budget))
    except ValueError as e:
        raise ConfigError(f"memory.tiers: {e}") from None
    for p in placements:
        notes.append(f"{p.name} pool on NUMA nodes {list(p.nodes)}{' interleaved' if p.interleave else ''} "
                     f"({p.local_bytes / GB:.1f} GB local, {p.cxl_bytes / GB:.1f} GB CXL)")
    kwargs = [{"numa_nodes": list(p.nodes), "interleave": p.interleave} for p in placements]
    return kwargs[0], (kwargs[1] if len(kwargs) > 1 else {})
