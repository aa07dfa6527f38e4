"""Config -> memory plan -> runtime: the one way from a config to where every byte lives.

    caps = live_capacities(cfg, device)          # longtune train: what this machine has free now
    caps = profile_capacities(cfg, machine)      # longtune plan: what the machine profile says
    plan = plan_memory(cfg, caps)                # the MILP decides activations, optimizer state and weights
    runtime = build_runtime(cfg, model, plan, device)

`longtune plan` and `longtune train` both go through `plan_memory`; `auto` placements are decided once, by
the solver. Activations are planned when `memory.budget_gb` or `memory.plan` is set; otherwise autograd
keeps them all and the plan only places the state (with every activation counted on the GPU).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil

from longtune.planner.plan import Plan, PlanInfeasible, as_this_runs_plan, make_plan, mismatches
from longtune.planner.problem import (AdapterSizing, GaloreSizing, Machine, ModelShape, ProfileError, Sharding, build_problem,
                                      drives_shared, ranks_per_node)

from .config import Config, ConfigError
from .inputs import PLANNER_KEYS, check_architecture, written_model_config

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


def hf_config_dict(cfg: Config) -> dict:
    """The transformers config as a dict, transformers' defaults filled in; reads no weights. A config as written
    that holds every key the planner reads is taken as it is, without importing transformers (or torch)."""
    written = written_model_config(cfg.model)
    if written is not None and all(written.get(k) is not None for k in PLANNER_KEYS):
        return written
    from .model import build_config

    return build_config(cfg.model).to_dict()


def load_machine(name_or_path: str) -> Machine:
    try:
        return Machine.load(name_or_path)
    except FileNotFoundError as e:
        raise ConfigError(f"memory.machine: {e}") from None
    except ProfileError as e:
        raise ConfigError(f"memory.machine: {e}") from None


def activations_planned(cfg: Config) -> bool:
    return cfg.memory.budget_gb is not None or cfg.memory.plan != "auto"


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


def strategy_of(cfg: Config, world: int) -> str:
    """parallel.strategy with `auto` resolved: single for one process, ddp for more."""
    s = cfg.parallel.strategy
    return ("single" if world == 1 else "ddp") if s == "auto" else s


def sharding_of(cfg: Config, world: int) -> Sharding:
    """What each rank keeps 1/world of under this config's strategy (the planner sizes one rank)."""
    strategy = strategy_of(cfg, world)
    if world == 1 or strategy in ("single", "ddp"):
        return Sharding(world)
    stage = 3 if strategy == "fsdp2" else zero_stage_of(cfg)
    return Sharding(world, optimizer=stage >= 1, grads=stage >= 2, weights=stage >= 3)


def zero_stage_of(cfg: Config) -> int:
    """The ZeRO stage DeepSpeed will run: the user's JSON's (parallel.deepspeed_config), else parallel.zero_stage."""
    path = cfg.parallel.deepspeed_config
    if path is None:
        return cfg.parallel.zero_stage
    import json

    try:
        stage = json.loads(Path(path).expanduser().read_text()).get("zero_optimization", {}).get("stage", 0)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise ConfigError(f"parallel.deepspeed_config: {path} is not a readable DeepSpeed JSON object: {e}") from None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.deepspeed_config: {path} has zero_optimization.stage={stage!r}; ZeRO stages are 0-3")
    return stage


def adapter_sizing(cfg: Config) -> Optional[AdapterSizing]:
    a = cfg.adapter
    return AdapterSizing(a.rank, tuple(a.target_modules)) if a.kind == "lora" else None


def planning_problem(cfg: Config, machine: Machine, caps: Capacities, activations: Optional[bool] = None,
                     count_activations: bool = True, world: int = 1):
    """The planner's Problem for this config on `machine` with `caps`."""
    mem = cfg.memory
    optimizer, params = mem.optimizer, mem.params
    if strategy_of(cfg, world) in ("fsdp2", "deepspeed"):  # the strategy owns the state: see sharding_of
        offload = cfg.parallel.offload_optimizer == "cpu" or cfg.parallel.offload_params == "cpu"
        optimizer = "cpu" if offload else "gpu"  # the planner's host optimizer stands for ZeRO-Offload's
        params = "cpu" if cfg.parallel.offload_params == "cpu" else "gpu"
    hf = hf_config_dict(cfg)
    check_architecture(hf, cfg)
    try:
        shape = ModelShape.from_hf_config(hf, cfg.model.dtype)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model: the planner cannot size this model: {e}") from None
    tokens = cfg.data.seq_len * cfg.train.micro_batch_size // cfg.parallel.sequence_parallel  # this rank's share
    chunks, local = plan_chunks(cfg), cfg.data.seq_len // cfg.parallel.sequence_parallel
    if chunks > local:
        raise ConfigError(f"memory.plan_chunks={chunks} is more than the {local} tokens of a sequence"
                          f"{' shard' if local < cfg.data.seq_len else ''}")
    k = cfg.model.kernels
    kernels = frozenset(name for name, on in (("rmsnorm", k.rmsnorm), ("rope", k.rope), ("swiglu", k.swiglu)) if on)
    machine = drives_shared(machine, world).with_capacities(caps.gpu, host=caps.host, cxl=caps.cxl, nvme=caps.nvme)
    try:
        return build_problem(
            shape, tokens, machine, budget_bytes=caps.gpu, chunks=chunks, optimizer=optimizer,
            params=params, loss_chunk_tokens=_ce_chunk_tokens(cfg, shape, tokens) if k.fused_ce else None,
            kernels=kernels, prefetch_depth=mem.prefetch_depth,
            offload_activations=activations_planned(cfg) if activations is None else activations,
            checkpointed=mem.gradient_checkpointing, count_activations=count_activations, galore=galore_sizing(cfg),
            sharding=sharding_of(cfg, world), sequence_parallel=cfg.parallel.sequence_parallel,
            adapter=adapter_sizing(cfg))
    except ValueError as e:
        raise ConfigError(f"memory: {e}") from None


CHUNK_TOKENS, MAX_CHUNKS = 512, 16


def plan_chunks(cfg: Config) -> int:
    """memory.plan_chunks, `auto` resolved: a chunk per 512 tokens of a sequence (of this rank's shard of it under
    sequence parallelism), 1 to 16."""
    if cfg.memory.plan_chunks != "auto":
        return cfg.memory.plan_chunks
    return max(1, min(MAX_CHUNKS, cfg.data.seq_len // cfg.parallel.sequence_parallel // CHUNK_TOKENS))


def _ce_chunk_tokens(cfg: Config, shape: ModelShape, tokens: int) -> int:
    """The chunk the fused loss will use, so the plan counts the head workspace it really needs."""
    from longtune.kernels.chunking import default_chunk_size

    return cfg.model.kernels.ce_chunk_tokens or default_chunk_size(tokens, shape.layer.hidden, shape.vocab)


def plan_memory(cfg: Config, caps: Capacities, machine: Optional[Machine] = None,
                activations: Optional[bool] = None, world: int = 1) -> Plan:
    """The plan of this run: memory.plan's file (checked against this config and machine) or a solved one.

    Raises PlanInfeasible when nothing fits, ConfigError for a plan file that does not fit this run."""
    machine = machine or load_machine(cfg.memory.machine)
    problem = planning_problem(cfg, machine, caps, activations, world=world)
    mem = cfg.memory
    if mem.plan != "auto":
        plan = read_plan(mem.plan)
        wrong = mismatches(plan.problem, problem)
        if wrong:
            raise ConfigError(f"memory.plan: {mem.plan} was made for another run: it has {'; '.join(wrong)} "
                              "(solve a new one with `longtune plan`, or memory.plan=auto)")
        try:
            return as_this_runs_plan(plan, problem)
        except ValueError as e:
            raise ConfigError(f"memory.plan: {mem.plan}: {e} (solve a new one with `longtune plan`, or "
                              "memory.plan=auto)") from None
    solve = lambda p: make_plan(p, time_limit=mem.plan_time_limit_s, gap=mem.plan_gap)  # noqa: E731
    try:
        return solve(problem)
    except PlanInfeasible as e:
        if problem.offload_activations or e.missing_bytes is None:
            raise  # a budget the user set, or tiers that cannot hold the state: refuse, with the shortfall
        # Autograd keeps the activations and the device looks too small: the user should hear it, but the
        # estimate is an upper bound and the GPU budget is not theirs to keep here, so the run goes on, with the
        # state placed as if the activations took nothing (and, if even that does not fit, at the smallest budget).
        warning = (f"with every activation kept by autograd the step needs about {e.min_budget_bytes / GB:.1f} GB on "
                   f"the device, which has {caps.gpu / GB:.1f} GB: set memory.budget_gb=auto to plan them "
                   "(offload and recompute)")
        try:
            plan = solve(planning_problem(cfg, machine, caps, False, count_activations=False, world=world))
        except PlanInfeasible as e2:
            if e2.missing_bytes is None:
                raise
            bigger = Capacities(e2.min_budget_bytes, caps.host, caps.cxl, caps.nvme)
            plan = solve(planning_problem(cfg, machine, bigger, False, count_activations=False, world=world))
            warning = (f"the weights, gradients, optimizer state and loss alone need about {e2.min_budget_bytes / GB:.1f} "
                       f"GB on the device, which has {caps.gpu / GB:.1f} GB: move state off it (memory.optimizer, "
                       "memory.params) or set memory.budget_gb=auto")
        plan.warnings.append(warning)
        return plan


MAX_SEARCHED_TOKENS = 1 << 34
SEARCH_STEP_TOKENS = 1024  # per sequence-parallel rank


def longest_context(cfg: Config, machine: Machine, world: int, on_probe=None,
                    solved: Optional[dict[int, Optional[Plan]]] = None) -> tuple[int, Optional[Plan]]:
    """The longest data.seq_len whose plan fits one rank of `world` on `machine` (the profile's capacities, as
    `longtune plan` spends them), searched in steps of 1024 tokens per sequence-parallel rank: doubling from the
    config's length, then bisecting. The model's position limit is not a memory limit: it is lifted here.
    on_probe(seq_len, fits) is called after each solve. `solved`: lengths already planned (None: infeasible), not
    solved again. Returns (seq_len, its plan), or (0, None)."""
    unit = SEARCH_STEP_TOKENS * cfg.parallel.sequence_parallel

    def plan_at(n: int) -> Optional[Plan]:
        if solved is not None and n in solved:
            return solved[n]
        model = cfg.model.model_copy(update={"max_position_embeddings": max(n, cfg.model.max_position_embeddings or 0)})
        at = cfg.model_copy(update={"data": cfg.data.model_copy(update={"seq_len": n}), "model": model})
        try:
            plan = plan_memory(at, profile_capacities(at, machine, world), machine, activations=True, world=world)
        except PlanInfeasible:
            plan = None
        if on_probe:
            on_probe(n, plan is not None)
        return plan

    lo, lo_plan = 0, None  # lo fits (0: nothing known to), hi does not
    n = max(unit, cfg.data.seq_len // unit * unit)
    while True:
        plan = plan_at(n)
        if plan is None:
            hi = n
            break
        lo, lo_plan, n = n, plan, n * 2
        if n > MAX_SEARCHED_TOKENS:  # a workspace that grows with the tokens ends any search well before this
            return lo, lo_plan
    while hi - lo > unit:
        mid = (lo + hi) // 2 // unit * unit
        if mid <= lo:
            break
        plan = plan_at(mid)
        if plan is None:
            hi = mid
        else:
            lo, lo_plan = mid, plan
    return lo, lo_plan


def read_plan(path: str) -> Plan:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"memory.plan: {path} does not exist")
    import yaml

    try:
        data = yaml.safe_load(p.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"memory.plan: {path} is not a text file") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"memory.plan: {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"memory.plan: {path} is not a longtune plan (a mapping written by `longtune plan`), "
                          f"it holds a {type(data).__name__}")
    try:
        return Plan.from_dict(data)
    except KeyError as e:
        raise ConfigError(f"memory.plan: {path} is not a longtune plan: it has no {e} key") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"memory.plan: {path} is not a longtune plan: {e}") from None


def infeasible_error(e: PlanInfeasible) -> ConfigError:
    """A plan that does not fit, as the one-line config error `longtune train` exits 2 with."""
    return ConfigError(str(e))


# --- the runtime -------------------------------------------------------------------------------


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
        strategy_owns_state=strategy_of(cfg, world) in ("fsdp2", "deepspeed"),
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
    if world == 1 or strategy_of(cfg, world) != "ddp":
        return None
    if plan.optimizer_tier == "gpu" and not (cfg.optim.name == "galore_adamw" and cfg.optim.galore.layerwise):
        return None
    import torch.distributed as dist

    return dist.group.WORLD


def galore_sizing(cfg: Config) -> Optional[GaloreSizing]:
    """What the planner counts for the GaLore optimizer's state (None: AdamW)."""
    if cfg.optim.name != "galore_adamw":
        return None
    g = cfg.optim.galore
    return GaloreSizing(rank=g.rank, stores_basis=g.projector != "random", layerwise=g.layerwise, eight_bit=g.eight_bit,
                        accumulation=cfg.train.grad_accum_steps,
                        refreshing_share=1.0 / g.update_proj_gap if g.stagger else 1.0)


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
