"""A Plan: the decisions for every layer, what they are predicted to cost, and how they were found.

    plan = make_plan(problem)          # solve, verify with evaluate(), fall back if needed
    Path("plan.yaml").write_text(plan.to_yaml())
    same = Plan.from_yaml(text)        # versioned round trip
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from .arena import plan_arena
from .evaluate import GPU, RECOMPUTE, Decisions, Evaluation, evaluate
from .milp import SolverError, min_gpu_budget, solve_schedule
from .problem import CLASSES, Problem, Tier

PLAN_VERSION = 1


class PlanInfeasible(Exception):
    """No plan fits the budget; says by how much it is short."""

    def __init__(self, budget_bytes: float, min_budget_bytes: float):
        self.budget_bytes, self.min_budget_bytes = budget_bytes, min_budget_bytes
        self.missing_bytes = min_budget_bytes - budget_bytes
        super().__init__(
            f"no plan fits a GPU budget of {budget_bytes / 1e9:.2f} GB: {self.missing_bytes / 1e9:.2f} GB missing; "
            f"the smallest feasible budget is {min_budget_bytes / 1e9:.2f} GB (memory.budget_gb={_round_up_gb(min_budget_bytes)})"
        )


def _round_up_gb(x: float) -> float:
    return math.ceil(x / 1e7) / 100  # up to the next 0.01 GB, so the suggestion is feasible


@dataclass
class Plan:
    problem: Problem
    layers: Decisions
    predicted: dict[str, Any]
    solver: dict[str, Any]
    binding: list[str]
    arena: Optional[dict[str, Any]] = None
    version: int = PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "inputs": problem_to_dict(self.problem),
            "predicted": self.predicted,
            "solver": self.solver,
            "binding": self.binding,
            "arena": self.arena,
            "layers": self.layers,
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')!r} is not supported (this longtune reads version {PLAN_VERSION})")
        return cls(problem_from_dict(d["inputs"]), d["layers"], d["predicted"], d["solver"], d["binding"], d.get("arena"))

    @classmethod
    def from_yaml(cls, text: str) -> "Plan":
        return cls.from_dict(yaml.safe_load(text))


def problem_to_dict(problem: Problem) -> dict[str, Any]:
    d = dataclasses.asdict(problem)
    d["all_or_nothing"] = list(problem.all_or_nothing)
    return _plain(d)


def problem_from_dict(d: dict[str, Any]) -> Problem:
    d = dict(d)
    d["tiers"] = tuple(Tier(**t) for t in d["tiers"])
    d["all_or_nothing"] = tuple(d["all_or_nothing"])
    return Problem(**d)


def _plain(x: Any) -> Any:
    """Tuples to lists, so the YAML is plain and safe_load reads it back."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# --- making a plan -------------------------------------------------------------------------


def fallback_decisions(problem: Problem) -> Decisions:
    """MEMO's rule as a safe default: offload the layer input and attention output to the
    largest tier, recompute every recomputable class, keep what cannot go anywhere else."""
    G = problem.chunks
    tier = max(problem.tiers, key=lambda t: t.capacity_bytes).name if problem.tiers else None
    layers = []
    for _ in range(problem.num_layers):
        layer = {}
        for c in CLASSES:
            if c in problem.recompute_s:
                layer[c] = {RECOMPUTE: G}
            else:
                layer[c] = {tier or GPU: G}
        layers.append(layer)
    return layers


def binding_constraints(problem: Problem, ev: Evaluation, tolerance: float = 0.005) -> list[str]:
    """The limits the plan presses against, in words."""
    out = []
    names = ["the LM head"] + [f"backward of layer {j}" for j in reversed(range(problem.num_layers))]
    tight = [n for n, row in zip(names, ev.gpu_rows) if row >= problem.budget_bytes * (1 - tolerance)]
    if tight:
        out.append(f"GPU budget {problem.budget_bytes / 1e9:.2f} GB at {_fold_names(tight)}")
    for name, used in ev.tier_bytes.items():
        cap = next(t.capacity_bytes for t in problem.tiers if t.name == name)
        if used >= cap * (1 - tolerance):
            out.append(f"{name} capacity {cap / 1e9:.1f} GB")
    d2h = [l for l, s in enumerate(ev.exposed_d2h_s) if s > 1e-6]
    h2d = [l for l, s in enumerate(ev.exposed_h2d_s) if s > 1e-6]
    if d2h:
        out.append(f"device-to-host copies exceed the forward of layers {_fold(d2h)} by {sum(ev.exposed_d2h_s):.3f} s")
    if h2d:
        out.append(f"prefetches exceed their backward window for layers {_fold(h2d)} by {sum(ev.exposed_h2d_s):.3f} s")
    return out


def _fold(ids: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2, 5, 7-8'."""
    runs, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            runs.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(runs)


def _fold_names(names: list[str]) -> str:
    layers = sorted(int(n.rsplit(" ", 1)[1]) for n in names if n.startswith("backward"))
    parts = [n for n in names if not n.startswith("backward")]
    if layers:
        parts.append(f"backward of layer{'s' if len(layers) > 1 else ''} {_fold(layers)}")
    return " and ".join(parts)


def predicted(problem: Problem, ev: Evaluation) -> dict[str, Any]:
    return {
        "step_time_s": ev.step_time_s,
        "compute_s": ev.compute_s,
        "recompute_s": ev.recompute_s,
        "exposed_transfer_s": ev.exposed_transfer_s,
        "peak_bytes": {"gpu": ev.gpu_peak_bytes, **ev.tier_bytes},
        "gpu_fixed_bytes": problem.fixed_total,
        "tokens_per_s": problem.meta.get("tokens", 0) / ev.step_time_s if ev.step_time_s else None,
    }


def make_plan(
    problem: Problem,
    solver: Optional[str] = None,
    time_limit: float = 10.0,
    gap: float = 0.01,
    with_arena: bool = True,
) -> Plan:
    """Solve the schedule MILP; verify the answer independently; fall back to MEMO's rule if the
    solver gives nothing usable. Raises PlanInfeasible with the missing bytes."""
    start = time.perf_counter()
    note = None
    try:
        solution = solve_schedule(problem, solver, time_limit, gap)
    except SolverError as e:
        solution, note = None, str(e)
    if solution is not None and solution.status == "infeasible":
        raise PlanInfeasible(problem.budget_bytes, min_gpu_budget(problem, solver, time_limit))
    decisions, info = None, {}
    if solution is not None:
        ev = evaluate(problem, solution.decisions)
        if ev.feasible:
            decisions = solution.decisions
            info = {"name": solution.solver, "status": solution.status, "solve_s": solution.solve_s, "gap": solution.gap}
        else:
            note = f"solver answer failed verification: {'; '.join(ev.violations)}"
    if decisions is None:
        decisions = fallback_decisions(problem)
        ev = evaluate(problem, decisions)
        if not ev.feasible:
            raise PlanInfeasible(problem.budget_bytes, min_gpu_budget(problem, solver, time_limit))
        info = {"name": "fallback (MEMO rule)", "status": "feasible", "solve_s": time.perf_counter() - start, "gap": None}
    if note:
        info["note"] = note
    plan = Plan(problem, decisions, predicted(problem, ev), info, binding_constraints(problem, ev))
    if with_arena:
        plan.arena = _arena_summary(problem, decisions)
    plan.solver["total_s"] = time.perf_counter() - start
    return plan


def _arena_summary(problem: Problem, decisions: Decisions) -> dict[str, Any]:
    result = plan_arena(problem, decisions)
    return {"size_bytes": result.size, "lower_bound_bytes": result.lower_bound, "gap": result.gap,
            "method": result.method, "solve_s": result.solve_s, "offsets": result.offsets}



