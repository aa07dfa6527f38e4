"""Config + plan -> the MemoryRuntime that carries the plan out: options, NUMA binding of its host pools, GaLore;
and the process's memory outside the plan (its baseline).

    caps = live_capacities(cfg, device)          # capacities.py: what this machine has free now
    plan = plan_memory(cfg, caps)                # planning.py: the MILP decides activations, state and weights
    runtime = build_runtime(cfg, model, plan, device)
    baseline_bytes(model)                        # right before the first step: what no plan counts
"""

from __future__ import annotations

from longtune.planner.plan import Plan

from .capacities import GB
from .config import Config, ConfigError
from .layout import ParallelLayout


def build_runtime(cfg: Config, model, plan: Plan, device, world: int = 1, sequence=None):
    """The MemoryRuntime that carries out `plan` for this config; the model is moved where the plan says."""
    steady_allocator()
    from longtune.offload.nvme import NvmeError
    from longtune.offload.runtime import MemoryRuntime, RuntimeOptions

    t, o, mem = cfg.train, cfg.optim, cfg.memory
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    weight_bytes = next(model.parameters()).element_size()
    numa_optimizer, numa_weights, numa_tiers, notes = _numa_placement(cfg, plan, n_params, weight_bytes)
    options = RuntimeOptions(
        device=device, lr=t.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
        clip_grad_norm=t.clip_grad_norm, activations=plan.problem.offload_activations,
        prefetch_depth=mem.prefetch_depth, nvme_path=mem.nvme_path, nvme_checksum=mem.nvme_checksum,
        nvme_backend=mem.nvme_backend, cpu_adam=mem.cpu_adam, numa_optimizer=numa_optimizer,
        numa_weights=numa_weights, numa_activations=numa_tiers, galore=galore_options(cfg),
        galore_layerwise=o.name == "galore_adamw" and o.galore.layerwise,
        galore_fused_update=_galore_kernel(device) if o.name == "galore_adamw" else None,
        process_group=_own_reduction_group(cfg, plan, world),
        # FSDP2 / DeepSpeed own the optimizer state and weights (ZeRO-Offload moves them): torch AdamW on the device
        strategy_owns_state=ParallelLayout.of(cfg, world).strategy_owns_state,
        sequence=sequence)
    if "nvme" in _tiers_used(plan) and not mem.nvme_path:
        raise ConfigError("the plan puts data on nvme: set memory.nvme_path to a folder on the NVMe drive")
    if options.galore is not None:
        from longtune.offload.galore import galore_targets

        names = [n for n, p in model.named_parameters() if p.ndim == 2 and p.requires_grad]
        targets = galore_targets(names, options.galore.targets)
        if not targets:
            raise ConfigError(f"optim.galore.targets {list(options.galore.targets)} match no 2-D weight of this model "
                              f"(its names look like {names[min(1, len(names) - 1)] if names else 'none'})")
        g = cfg.optim.galore
        notes.append(f"optimizer: GaLore AdamW on {len(targets)} weights, rank {g.rank}, {g.projector} projector "
                     f"refreshed every {g.update_proj_gap} steps{' (staggered)' if g.stagger else ''}"
                     f"{', layer-wise updates in backward' if g.layerwise else ''}")
    try:
        runtime = MemoryRuntime(model, plan, options)
    except NvmeError as e:
        raise ConfigError(f"memory.nvme_path: {e}") from None
    runtime.notes[:0] = notes
    return runtime


def _own_reduction_group(cfg: Config, plan: Plan, world: int):
    """The process group an optimizer that takes each gradient during backward (offloaded, layer-wise GaLore)
    averages them over under DDP; None where a DDP wrapper (or no data parallelism) does it."""
    if world == 1 or ParallelLayout.of(cfg, world).strategy != "ddp":
        return None
    if plan.optimizer_tier == "gpu" and not (cfg.optim.name == "galore_adamw" and cfg.optim.galore.layerwise):
        return None
    import torch.distributed as dist

    return dist.group.WORLD


def _galore_kernel(device):
    """GaLore's fused project-back + update kernel on a GPU (on the CPU the interpreter would only be slower)."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    from longtune.kernels.galore_update import galore_update

    return galore_update


def galore_options(cfg: Config):
    """The GaLore optimizer's options, or None for plain AdamW."""
    if cfg.optim.name != "galore_adamw":
        return None
    from longtune.offload.galore import GaloreOptions

    g = cfg.optim.galore
    return GaloreOptions(rank=g.rank, update_proj_gap=g.update_proj_gap, scale=g.scale, projector=g.projector,
                         on_refresh=g.on_refresh, stagger=g.stagger, seed=g.seed, targets=tuple(g.targets),
                         eight_bit=g.eight_bit)


def _tiers_used(plan: Plan) -> set[str]:
    used = {plan.optimizer_tier, plan.params_tier}
    if plan.problem.offload_activations:
        used |= {p for layer in plan.layers for d in layer.values() for p in d}
    return used


def _numa_placement(cfg: Config, plan: Plan, n_params: int, weight_bytes: int):
    """NUMA binding of the host pools, by the CXL-aware policy (Liaw & Chen): fp32 optimizer state prefers
    local DRAM; the weights (model dtype) and activations may go to CXL; a pool that straddles the local budget
    is interleaved over local + CXL nodes. With no CXL node everything is bound to the local node (a real
    mbind) and a cxl tier is emulated there."""
    # numa is looked up at call time, so a test can stand a fake sysfs tree in for read_nodes.
    from longtune.offload.numa import cxl_nodes, local_nodes, read_nodes
    from longtune.offload.placement import PlacementRequest, TensorKind, place
    from longtune.planner.problem import HOST_OPTIMIZER_BYTES

    notes: list[str] = []
    try:
        nodes = read_nodes()
    except OSError:
        return {}, {}, {}, notes
    local, cxl = local_nodes(nodes), cxl_nodes(nodes)
    if not local:
        return {}, {}, {}, notes
    bind_local = {"numa_nodes": [local[0].id]}
    if not cxl:
        if {plan.optimizer_tier, plan.params_tier} & {"cpu", "nvme"} or plan.problem.offload_activations:
            notes.append(f"host tier bound to NUMA node {local[0].id}; no CXL node: the cxl tier is emulated on node {local[0].id}")
        return bind_local, bind_local, {"host": bind_local, "cxl": bind_local}, notes
    budget = cfg.memory.tiers.host_gb * GB if cfg.memory.tiers.host_gb is not None else sum(n.free_bytes for n in local)
    requests = [PlacementRequest("optimizer", HOST_OPTIMIZER_BYTES * n_params, TensorKind.FP32_MOMENTUM)]
    if plan.params_tier == "cpu":
        requests.append(PlacementRequest("weights", weight_bytes * n_params, TensorKind.BF16_WEIGHT))
    try:
        placements = place(requests, nodes, int(budget))
    except ValueError as e:
        raise ConfigError(f"memory.tiers: {e}") from None
    for p in placements:
        notes.append(f"{p.name} pool on NUMA nodes {list(p.nodes)}{' interleaved' if p.interleave else ''} "
                     f"({p.local_bytes / GB:.1f} GB local, {p.cxl_bytes / GB:.1f} GB CXL)")
    kwargs = [{"numa_nodes": list(p.nodes), "interleave": p.interleave} for p in placements]
    for kw, p in zip(kwargs, placements):
        total = p.local_bytes + p.cxl_bytes
        if p.interleave and 0 < p.local_bytes and p.local_bytes * len(p.nodes) < total:
            # Below an even split plain interleave would put too much on the local node: the pool binds its
            # head interleaved and its tail to CXL (offload/placement.py, placement_ranges).
            kw["numa_local_share"] = p.local_bytes / total
    striped = {"numa_nodes": [n.id for n in cxl], "interleave": len(cxl) > 1}
    return kwargs[0], (kwargs[1] if len(kwargs) > 1 else {}), {"host": bind_local, "cxl": striped}, notes


# --- the process's memory outside the plan ----------------------------------------------------------------------
MMAP_THRESHOLD = 128 << 10  # glibc's default, before it starts to move


def steady_allocator() -> bool:
    """Keep glibc's malloc from holding freed memory: its mmap threshold fixed at 128 KB (and the trim threshold
    with it), then what it holds free given back (malloc_trim). By default the threshold rises to the largest block
    freed, up to 32 MB (the model's load frees many), after which activation-sized buffers come from the heap and
    stay in the process when freed: its memory tracks its history, not what it holds (SmolLM2 at 2048 tokens under
    a 6 GB cap: killed at the cap, where it peaks at 5.17 GB with the threshold fixed). A threshold the user set
    (MALLOC_MMAP_THRESHOLD_) is kept. Returns whether it applied (glibc only)."""
    import ctypes
    import os

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD)):
        return False
    trim(ctypes.c_size_t(0))
    return True

def process_memory_bytes() -> tuple[int, str]:
    """This process's memory now, and how it was read: the usage of its memory cgroup where it is the only process
    there (a `longtune bench` probe, a container of its own: what the kernel charges it, the page cache it caused
    included, and what a cgroup's cap limits), else its resident set (VmRSS)."""
    usage = _own_cgroup_usage()
    if usage is not None:
        return usage, "cgroup"
    import resource

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize(), "rss"
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak rss"


def _own_cgroup_usage():
    """memory.current (cgroup v2) or memory.usage_in_bytes (v1) of this process's memory cgroup, where no other
    process is in it; None otherwise or where it cannot be read."""
    import os
    from pathlib import Path

    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            folder, usage = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.current"
        elif "memory" in controllers.split(","):
            folder, usage = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.usage_in_bytes"
        else:
            continue
        try:
            procs = (folder / "cgroup.procs").read_text().split()
            if procs == [str(os.getpid())]:
                return int((folder / usage).read_text())
        except (OSError, ValueError):
            continue
    return None


def baseline_bytes(model) -> tuple[int, str]:
    """The process's memory outside the plan, right before its first step: process_memory_bytes() less what the plan
    counts that is already there, the weights in host memory (where the device is the CPU; tied and shared storages
    once) and the host pools' pages in memory (offload/pinned.py: the host tiers, the optimizer's state, staging;
    all of a pinned pool). What is left: the interpreter, the libraries, the tokenizer and data, what loading the
    model left behind (a GGUF file's page cache, the allocator's heap), the runtime's own objects. The moments of
    torch AdamW and the activations come in the first step and are the plan's.
    Returns (bytes, how the process's memory was read: 'cgroup' or 'rss')."""
    from longtune.offload.pinned import in_pool, resident_bytes

    memory, how = process_memory_bytes()
    seen: set[int] = set()
    weights = 0
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "cpu":
            continue
        try:
            storage = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()  # an FSDP2 shard: its own
        except (RuntimeError, NotImplementedError):  # a tensor without storage of its own
            continue
        ptr = storage.data_ptr()
        if ptr in seen or ptr == 0 or in_pool(ptr):
            continue
        seen.add(ptr)
        weights += storage.nbytes()
    return max(0, memory - weights - resident_bytes()), how
