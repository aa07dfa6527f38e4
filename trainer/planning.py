"""Config -> the planner's problem -> the plan of this run. `longtune plan` and `longtune train` both go through
`plan_memory`; `auto` placements are decided once, by the solver. Activations are planned when
`memory.budget_gb` or `memory.plan` is set; otherwise autograd keeps them all and the plan only places the
state (with every activation counted on the GPU). After this, the plan says it (`plan.problem.offload_activations`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from longtune.planner.plan import Plan, PlanInfeasible, as_this_runs_plan, make_plan, mismatches
from longtune.planner.problem import AdapterSizing, GaloreSizing, Machine, ModelShape, build_problem, drives_shared

from .capacities import GB, Capacities, load_machine
from .config import Config, ConfigError
from .inputs import PLANNER_KEYS, check_architecture, written_model_config
from .layout import ParallelLayout


def hf_config_dict(cfg: Config) -> dict:
    """The transformers config as a dict, transformers' defaults filled in; reads no weights. A config as written
    that holds every key the planner reads is taken as it is, without importing transformers (or torch)."""
    written = written_model_config(cfg.model)
    if written is not None and all(written.get(k) is not None for k in PLANNER_KEYS):
        return written
    from .model import build_config

    return build_config(cfg.model).to_dict()


def activations_planned(cfg: Config) -> bool:
    return cfg.memory.budget_gb is not None or cfg.memory.plan != "auto"


def adapter_sizing(cfg: Config) -> Optional[AdapterSizing]:
    a = cfg.adapter
    if a.kind == "none":
        return None
    compute = cfg.model.dtype if a.compute_dtype == "auto" else a.compute_dtype
    return AdapterSizing(a.rank, tuple(a.target_modules), quantized=a.kind == "qlora", double_quant=a.double_quant,
                         compute_bytes={"float32": 4, "bfloat16": 2, "float16": 2}[compute],
                         saved=tuple(a.modules_to_save))


def planning_problem(cfg: Config, machine: Machine, caps: Capacities, activations: Optional[bool] = None,
                     count_activations: bool = True, world: int = 1):
    """The planner's Problem for this config on `machine` with `caps`."""
    mem = cfg.memory
    optimizer, params = mem.optimizer, mem.params
    layout = ParallelLayout.of(cfg, world)
    if layout.strategy_owns_state:  # see ParallelLayout.sharding
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
            sharding=layout.sharding, sequence_parallel=cfg.parallel.sequence_parallel,
            adapter=adapter_sizing(cfg), accumulation=cfg.train.grad_accum_steps)
    except ValueError as e:
        raise ConfigError(f"memory: {e}") from None


CHUNK_TOKENS, MAX_CHUNKS = 512, 16
# Past 16 chunks of 8K tokens a chunk's graph (the MLP's intermediates above all) and its recompute grow with the
# sequence while K/V and the gradient sums cannot shrink: more chunks, each still a matmul of 8K+ rows.
LONG_CHUNK_TOKENS, MAX_LONG_CHUNKS = 8192, 64


def plan_chunks(cfg: Config) -> int:
    """memory.plan_chunks, `auto` resolved: a chunk per 512 tokens of a sequence (of this rank's shard of it under
    sequence parallelism), 1 to 16; past 16 x 8192 tokens, a chunk per 8192 tokens, at most 64."""
    if cfg.memory.plan_chunks != "auto":
        return cfg.memory.plan_chunks
    local = cfg.data.seq_len // cfg.parallel.sequence_parallel
    if local > MAX_CHUNKS * LONG_CHUNK_TOKENS:
        return min(MAX_LONG_CHUNKS, local // LONG_CHUNK_TOKENS)
    return max(1, min(MAX_CHUNKS, local // CHUNK_TOKENS))


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


def galore_sizing(cfg: Config) -> Optional[GaloreSizing]:
    """What the planner counts for the GaLore optimizer's state (None: AdamW)."""
    if cfg.optim.name != "galore_adamw":
        return None
    g = cfg.optim.galore
    return GaloreSizing(rank=g.rank, stores_basis=g.projector != "random", layerwise=g.layerwise, eight_bit=g.eight_bit,
                        accumulation=cfg.train.grad_accum_steps,
                        refreshing_share=1.0 / g.update_proj_gap if g.stagger else 1.0)
