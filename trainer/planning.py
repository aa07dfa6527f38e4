"""Config -> the planner's Problem and Plan. The planner itself knows nothing of configs."""

from __future__ import annotations

from pathlib import Path

from longtune.planner.plan import Plan, PlanInfeasible, make_plan
from longtune.planner.problem import Machine, ModelShape, build_problem
from longtune.planner.report import format_plan

from .config import Config, ConfigError
from .model import build_config


def hf_config_dict(cfg: Config) -> dict:
    """The transformers config as a dict, transformers' defaults filled in; reads no weights."""
    return build_config(cfg.model).to_dict()


def load_machine(name_or_path: str) -> Machine:
    try:
        return Machine.load(name_or_path)
    except FileNotFoundError as e:
        raise ConfigError(f"memory.machine: {e}") from None
    except (KeyError, TypeError) as e:
        raise ConfigError(f"memory.machine: {name_or_path} is not a valid machine profile (missing {e})") from None


def planning_problem(cfg: Config, machine: Machine):
    mem = cfg.memory
    hf = hf_config_dict(cfg)
    try:
        shape = ModelShape.from_hf_config(hf, cfg.model.dtype)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model: the planner cannot size this model: {e}") from None
    tokens = cfg.data.seq_len * cfg.train.micro_batch_size
    if mem.plan_chunks > tokens:
        raise ConfigError(f"memory.plan_chunks={mem.plan_chunks} is more than the {tokens} tokens of a micro-batch")
    # torch's AdamW keeps two moments in the parameters' dtype.
    optimizer_bytes = 2 * shape.layer.dtype_bytes
    optimizer, params = _placement(cfg, machine, shape)
    return build_problem(
        shape,
        tokens,
        machine,
        budget_bytes=mem.budget_gb * 1e9 if mem.budget_gb else None,
        chunks=mem.plan_chunks,
        optimizer_on_gpu=optimizer == "gpu",
        params_on_gpu=params == "gpu",
        optimizer_bytes_per_param=optimizer_bytes,
        loss_chunk_tokens=_ce_chunk_tokens(cfg, shape, tokens) if cfg.model.kernels.fused_ce else None,
    )


def _placement(cfg: Config, machine: Machine, shape: ModelShape) -> tuple[str, str]:
    """memory.optimizer/params with `auto` decided as the trainer would, on the profile's capacities."""
    mem = cfg.memory
    if "auto" not in (mem.optimizer, mem.params):
        return mem.optimizer, mem.params
    from .offloading import Capacities, resolve_placement

    tiers = {t.name: t.capacity_bytes for t in machine.tiers}
    t = mem.tiers
    pick = lambda name, cap: cap * 1e9 if cap is not None else tiers.get(name, 0.0)  # noqa: E731
    caps = Capacities(gpu=mem.budget_gb * 1e9 if mem.budget_gb else machine.gpu_bytes, host=pick("host", t.host_gb),
                      cxl=pick("cxl", t.cxl_gb), nvme=pick("nvme", t.nvme_gb))
    return resolve_placement(cfg, shape.params, shape.layer.dtype_bytes, caps)


def _ce_chunk_tokens(cfg: Config, shape: ModelShape, tokens: int) -> int:
    """The chunk the fused loss will use, so the plan counts the head workspace it really needs."""
    from longtune.kernels.fused_ce import default_chunk_size

    return cfg.model.kernels.ce_chunk_tokens or default_chunk_size(tokens, shape.layer.hidden, shape.vocab)


def plan_for(cfg: Config, machine_override: str | None = None) -> Plan:
    """The plan of `memory.plan`: a given file as it is, or one solved for this config."""
    if cfg.memory.plan != "auto":
        path = Path(cfg.memory.plan)
        if not path.is_file():
            raise ConfigError(f"memory.plan: {path} does not exist")
        try:
            return Plan.from_yaml(path.read_text())
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"memory.plan: {path} is not a longtune plan: {e}") from None
    machine = load_machine(machine_override or cfg.memory.machine)
    m = cfg.memory
    return make_plan(planning_problem(cfg, machine), time_limit=m.plan_time_limit_s, gap=m.plan_gap)


def describe(plan: Plan) -> str:
    """The plan as the table `longtune plan` prints."""
    return format_plan(plan)


__all__ = ["PlanInfeasible", "describe", "plan_for", "planning_problem", "load_machine", "hf_config_dict"]
