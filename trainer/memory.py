"""Config + plan -> the MemoryRuntime that carries the plan out: options, NUMA binding of its host pools, GaLore.

    caps = live_capacities(cfg, device)          # capacities.py: what this machine has free now
    plan = plan_memory(cfg, caps)                # planning.py: the MILP decides activations, state and weights
    runtime = build_runtime(cfg, model, plan, device)
"""

from __future__ import annotations

from longtune.planner.plan import Plan

from .capacities import GB
from .config import Config, ConfigError
from .layout import ParallelLayout


def build_runtime(cfg: Config, model, plan: Plan, device, world: int = 1, sequence=None):
    """The MemoryRuntime that carries out `plan` for this config; the model is moved where the plan says."""
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
