"""A Plan: the decisions for every layer, what they are predicted to cost, and how they were found.

    plan = make_plan(problem)          # solve, verify with evaluate(), fall back if needed
    Path("plan.yaml").write_text(plan.to_yaml())
    same = Plan.from_yaml(text)        # versioned round trip

A Plan is all the offload runtime (offload/) needs to carry it out: the decisions, in the words of
vocabulary.py (re-exported here), the arena's size and offsets (`Arena`), and what sizes the runtime's buffers
(`layer_regions()`, `nvme_ring_slots`, `nvme_state_stagings`). This is the one planner module offload/ imports.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from .arena import ArenaResult, layer_region_bytes, plan_arena
from .evaluate import Decisions, Evaluation, check_shape, evaluate, margin_bytes
from .milp import SolverError, TiersTooSmall, min_gpu_budget, solve_schedule
from .problem import NVME_STATE_STAGINGS, Problem, StateOption, Tier
from .timeline import nvme_ring_slots
# The vocabulary of plans, re-exported: offload/ reads it from here (the one planner module it imports).
from .vocabulary import CLASSES, CXL, GPU, HOST, NVME, RECOMPUTE, STATE_PLACES, TIER_NAMES  # noqa: F401

PLAN_VERSION = 2


class PlanInfeasible(Exception):
    """No plan fits: the GPU budget is short (by `missing_bytes`), or the tiers cannot hold the state."""

    def __init__(self, budget_bytes: float, min_budget_bytes: Optional[float], reason: Optional[str] = None):
        self.budget_bytes, self.min_budget_bytes = budget_bytes, min_budget_bytes
        if reason is not None or min_budget_bytes is None:
            self.missing_bytes = None
            super().__init__(f"no plan fits: {reason}")
            return
        # Never a negative shortfall: when the smallest budget found is not above the given one (the search's
        # own tolerance), the shortfall is the rounding step and the suggestion is just above the budget.
        self.min_budget_bytes = max(min_budget_bytes, budget_bytes + 1e7)
        self.missing_bytes = self.min_budget_bytes - budget_bytes
        super().__init__(
            f"no plan fits a GPU budget of {budget_bytes / 1e9:.2f} GB: {self.missing_bytes / 1e9:.2f} GB missing; "
            f"the smallest feasible budget is {self.min_budget_bytes / 1e9:.2f} GB "
            f"(memory.budget_gb={_round_up_gb(self.min_budget_bytes)})"
        )


def _round_up_gb(x: float) -> float:
    return math.ceil(x / 1e7) / 100  # up to the next 0.01 GB, so the suggestion is feasible


@dataclass(frozen=True)
class Arena:
    """The device block the runtime's staging and prefetch buffers are views into, as arena.plan_arena packed it.

    `offsets` holds each buffer's byte offset in the block by its name, "staging.<l>" or "prefetch.<l>" (a layer
    that offloads nothing has neither); `staging(l)` and `prefetch(l)` read them. The rest records the packing.
    In a plan file it is the mapping `to_dict` writes: the keys and order plan files have always had."""

    size_bytes: int
    offsets: dict[str, int]
    lower_bound_bytes: int = 0  # the most bytes alive at one time: no packing does better
    gap: float = 0.0  # (size - lower bound) / size
    method: str = ""  # how it was packed (ArenaResult.method)
    solve_s: float = 0.0

    def staging(self, layer: int) -> int:
        """Offset of layer `layer`'s staging buffer (its offloaded bytes on their way out)."""
        return self.offsets[f"staging.{layer}"]

    def prefetch(self, layer: int) -> int:
        """Offset of layer `layer`'s prefetch buffer (its offloaded bytes coming back)."""
        return self.offsets[f"prefetch.{layer}"]

    @classmethod
    def packed(cls, result: ArenaResult) -> "Arena":
        return cls(result.size, result.offsets, result.lower_bound, result.gap, result.method, result.solve_s)

    def to_dict(self) -> dict[str, Any]:
        return {"size_bytes": self.size_bytes, "lower_bound_bytes": self.lower_bound_bytes, "gap": self.gap,
                "method": self.method, "solve_s": self.solve_s, "offsets": dict(self.offsets)}

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> Optional["Arena"]:
        if d is None:
            return None
        if not isinstance(d, dict) or not isinstance(d.get("offsets"), dict) or "size_bytes" not in d:
            raise ValueError("its arena is not a mapping with size_bytes and offsets")
        fields = ("lower_bound_bytes", "gap", "method", "solve_s")
        return cls(d["size_bytes"], d["offsets"], **{k: d[k] for k in fields if k in d})


@dataclass
class Plan:
    problem: Problem
    layers: Decisions
    predicted: dict[str, Any]
    solver: dict[str, Any]
    binding: list[str]
    arena: Optional[Arena] = None
    state: Optional[str] = None  # the StateOption chosen: where optimizer state and weights live
    version: int = PLAN_VERSION
    warnings: list[str] = dataclasses.field(default_factory=list)  # for the user; not part of the plan file

    @property
    def state_option(self) -> Optional[StateOption]:
        return self.problem.state(self.state)

    @property
    def optimizer_tier(self) -> str:
        return self.state_option.optimizer if self.state_option else "gpu"

    @property
    def params_tier(self) -> str:
        return self.state_option.params if self.state_option else "gpu"

    # --- what the runtime sizes its buffers by (offload/ asks the plan, not the planner's modules) --------------

    def layer_regions(self) -> list[dict[str, int]]:
        """Per layer, {tier: bytes} of its offloaded activations: the size of its region of that tier's host pool
        (NVMe: of its file and ring slot) and of that tier's part of its staging and prefetch buffers, each tier's
        part after the one before (arena.layer_region_bytes: what the arena was packed for); {} for a layer that
        offloads nothing."""
        return [layer_region_bytes(self.problem, layer) for layer in self.layers]

    @property
    def nvme_ring_slots(self) -> int:
        """Host buffers NVMe activations pass through (timeline.nvme_ring_slots, at the plan's prefetch depth),
        each the size of the largest layer's NVMe region: the plan counts them in the host tier."""
        return nvme_ring_slots(self.problem.prefetch_depth)

    @property
    def nvme_state_stagings(self) -> int:
        """Staging buffers an optimizer on NVMe reads and writes its state through, each the largest parameter
        group's fp32 master and moments: the plan counts them in the host tier (problem.optimizer_host_buffers)."""
        return NVME_STATE_STAGINGS

    def recompute_by_part(self) -> dict[str, float]:
        """The step's predicted recompute seconds by part (pre, post): a chunk's price times the chunks recomputed
        (their sum is predicted["recompute_s"])."""
        return {c: self.problem.recompute_s[c] * sum(layer[c].get(RECOMPUTE, 0) for layer in self.layers)
                for c in self.problem.recompute_s}

    def evaluation(self) -> Evaluation:
        arena = self.arena.size_bytes if self.arena is not None else None
        return evaluate(self.problem, self.layers, self.state, arena_bytes=arena)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "inputs": problem_to_dict(self.problem),
            "state": self.state,
            "predicted": self.predicted,
            "solver": self.solver,
            "binding": self.binding,
            "arena": self.arena.to_dict() if self.arena is not None else None,
            "layers": self.layers,
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')!r} is not supported (this longtune reads version {PLAN_VERSION})")
        return cls(problem_from_dict(d["inputs"]), d["layers"], d["predicted"], d["solver"], d["binding"],
                   Arena.from_dict(d.get("arena")), d.get("state"))

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
    d["state_options"] = tuple(StateOption(**{**o, "gpu_rows": tuple(o.get("gpu_rows", ()))})
                               for o in d.get("state_options", ()))
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
    tier = max(problem.tiers, key=lambda t: t.capacity_bytes).name if problem.tiers and problem.offload_activations else None
    layers = []
    for _ in range(problem.num_layers):
        layer = {}
        for c in CLASSES:
            if c in problem.recompute_s and problem.offload_activations:
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


def predicted(problem: Problem, ev: Evaluation, state: Optional[str]) -> dict[str, Any]:
    option = problem.state(state)
    return {
        "step_time_s": ev.step_time_s,
        "compute_s": ev.compute_s,
        "recompute_s": ev.recompute_s,
        "exposed_transfer_s": ev.exposed_transfer_s,
        "state_s": ev.state_s,
        "peak_bytes": {"gpu": ev.gpu_peak_bytes, **ev.tier_bytes},
        "gpu_fixed_bytes": problem.fixed_total + (option.gpu_total if option else 0.0),
        "arena_bytes": ev.arena_bytes,
        "activation_peak_bytes": ev.activation_peak_bytes,  # saved activations on the device, at the worst position
        "tokens_per_s": problem.meta.get("sequence_tokens", problem.meta.get("tokens", 0)) / ev.step_time_s if ev.step_time_s else None,
    }


def _infeasible(problem: Problem, solver: Optional[str], time_limit: float) -> PlanInfeasible:
    try:
        return PlanInfeasible(problem.budget_bytes, min_gpu_budget(problem, solver, time_limit))
    except TiersTooSmall:
        return PlanInfeasible(problem.budget_bytes, None, _state_shortfall(problem))


def _state_shortfall(problem: Problem) -> str:
    """Why no placement of the state fits the tiers, for the placement that misses by the least."""
    caps = {t.name: t.capacity_bytes for t in problem.tiers}

    def missing(o: StateOption) -> list[tuple[str, float, float]]:
        return [(k, v, caps.get(k, 0.0)) for k, v in o.tier_bytes.items() if v > caps.get(k, 0.0)]

    best = min(problem.state_options, key=lambda o: sum(v - c for _, v, c in missing(o)), default=None)
    if best is None or not missing(best):
        return "the tiers cannot hold what must leave the GPU"
    tier, need, have = missing(best)[0]
    other = "nvme" if tier == "host" else "host"
    return (f"memory.optimizer={best.optimizer} memory.params={best.params} needs {need / 1e9:.1f} GB on the {tier} "
            f"tier, which holds {have / 1e9:.1f} GB: {(need - have) / 1e9:.1f} GB missing "
            f"(raise memory.tiers.{tier}_gb, or move state to {other})")


def make_plan(
    problem: Problem,
    solver: Optional[str] = None,
    time_limit: float = 10.0,
    gap: float = 0.01,
    with_arena: bool = True,
) -> Plan:
    """Solve the schedule MILP; verify the answer independently (with the packed arena's real size); fall back
    to MEMO's rule if the solver gives nothing usable. Raises PlanInfeasible with the missing bytes."""
    start = time.perf_counter()
    note = None
    target = problem
    for _ in range(3):  # the packed arena can come out above its lower bound: re-solve below the budget by that much
        try:
            solution = solve_schedule(target, solver, time_limit, gap)
        except SolverError as e:
            solution, note = None, str(e)
        if solution is not None and solution.status == "infeasible":
            raise _infeasible(problem, solver, time_limit)
        decisions, state, info, arena = None, None, {}, None
        if solution is not None:
            ev = evaluate(problem, solution.decisions, solution.state)
            if ev.feasible:
                decisions, state = _polish(problem, solution.decisions, solution.state), solution.state
                info = {"name": solution.solver, "status": solution.status, "solve_s": solution.solve_s, "gap": solution.gap}
            else:
                note = f"solver answer failed verification: {'; '.join(ev.violations)}"
        if decisions is None:
            decisions, state, ev = _fallback(problem)
            if decisions is None:
                raise _infeasible(problem, solver, time_limit)
            info = {"name": "fallback (MEMO rule)", "status": "feasible", "solve_s": time.perf_counter() - start, "gap": None}
        ev = evaluate(problem, decisions, state)
        if not with_arena:
            break
        arena = Arena.packed(plan_arena(problem, decisions))
        ev = evaluate(problem, decisions, state, arena_bytes=arena.size_bytes)
        excess = ev.gpu_peak_bytes - problem.budget_bytes
        if excess <= 0:
            break
        target = target.with_budget(target.budget_bytes - excess)
    else:
        raise _infeasible(problem, solver, time_limit)
    if note:
        info["note"] = note
    plan = Plan(problem, decisions, predicted(problem, ev, state), info, binding_constraints(problem, ev), arena, state)
    plan.solver["total_s"] = time.perf_counter() - start
    return plan


def plan_of(problem: Problem, decisions: Decisions, state: Optional[str] = None, how: str = "given") -> Plan:
    """A Plan for decisions made elsewhere (by hand, a test, another tool): checked, costed, its arena packed."""
    errors = check_shape(problem, decisions)
    if errors:
        raise ValueError("; ".join(errors))
    state = state if state is not None else (problem.state(None).name if problem.state_options else None)
    arena = Arena.packed(plan_arena(problem, decisions))
    ev = evaluate(problem, decisions, state, arena_bytes=arena.size_bytes)
    return Plan(problem, decisions, predicted(problem, ev, state), {"name": how, "status": "given", "solve_s": 0.0,
                                                                        "gap": None}, binding_constraints(problem, ev),
                arena, state)


def _polish(problem: Problem, decisions: Decisions, state: Optional[str]) -> Decisions:
    """Keep on the GPU what the solver moved for nothing. Inside its gap (1% by default) the solver may return
    chunks offloaded or recomputed where keeping them fits as well and costs no more; layer by layer, from the
    last, a layer's chunks all go back to the GPU when the plan stays feasible and no slower."""
    best = evaluate(problem, decisions, state)
    G = problem.chunks
    limit = problem.budget_bytes - margin_bytes(problem.budget_bytes)  # the solver's own rule
    decisions = [dict(layer) for layer in decisions]
    for l in reversed(range(problem.num_layers)):
        kept = {c: {GPU: G} for c in CLASSES}
        if decisions[l] == kept:
            continue
        trial = decisions[:l] + [kept] + decisions[l + 1:]
        ev = evaluate(problem, trial, state)
        if ev.feasible and ev.gpu_peak_bytes <= limit and ev.objective <= best.objective:
            decisions, best = trial, ev
    return decisions


def _fallback(problem: Problem):
    """MEMO's rule with the first placement of the state that passes; (None, None, None) if none does."""
    decisions = fallback_decisions(problem)
    for option in problem.state_options or (None,):
        name = option.name if option else None
        ev = evaluate(problem, decisions, name)
        if ev.feasible:
            return decisions, name, ev
    return None, None, None


# --- a plan given as a file ------------------------------------------------------------------


def as_this_runs_plan(plan: Plan, problem: Problem) -> Plan:
    """A plan file's decisions made this run's plan: its placement of the state must be one this run allows, its
    decisions valid for this run's problem, and fit it as costed with this run's own bytes; its arena is packed
    again. What runs, and what is logged as the plan, is then this run's, never the file's figures. Raises
    ValueError saying, in one line, why the file's decisions cannot run here (after `mismatches` is empty)."""
    allowed = [o.name for o in problem.state_options]
    if plan.state is not None and allowed and plan.state not in allowed:
        raise ValueError(f"it places the state as {plan.state}, which this run's memory.optimizer and memory.params "
                         f"do not allow (they allow {' | '.join(allowed)})")
    errors = check_shape(problem, plan.layers)
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ValueError(f"its decisions are not valid: {'; '.join(errors[:3])}{more}")
    given = plan_of(problem, plan.layers, plan.state, how="plan file")
    ev = given.evaluation()
    if not ev.feasible:
        raise ValueError(f"its decisions do not fit this run: {'; '.join(ev.violations)}")
    given.solver.update({k: v for k, v in plan.solver.items() if k in ("name", "status", "gap")}, given="plan file")
    return given


def mismatches(plan_problem: Problem, expected: Problem) -> list[str]:
    """How a plan's inputs differ from the problem this run would solve (empty: the plan fits this run)."""
    out = []
    a, b = plan_problem, expected

    def differ(x: float, y: float) -> bool:
        return abs(x - y) > 1e-6 * max(abs(x), abs(y), 1.0)

    if a.num_layers != b.num_layers:
        out.append(f"{a.num_layers} layers, this model has {b.num_layers}")
    ta, tb = a.meta.get("tokens"), b.meta.get("tokens")
    if ta != tb:
        out.append(f"{ta} tokens per micro-batch, this run has {tb}")
    if a.chunks != b.chunks:
        out.append(f"{a.chunks} chunks, memory.plan_chunks is {b.chunks}")
    if not out and any(differ(a.chunk_bytes[c], b.chunk_bytes[c]) for c in CLASSES):
        sizes = ", ".join(f"{c} {a.chunk_bytes[c]:.0f} vs {b.chunk_bytes[c]:.0f}" for c in CLASSES)
        out.append(f"activation sizes per chunk differ (another model, dtype or kernels: {sizes} bytes)")
    if a.budget_bytes > b.budget_bytes * (1 + 1e-9):  # a plan for less memory than this run has still fits
        out.append(f"a GPU budget of {a.budget_bytes / 1e9:.2f} GB, this run's is {b.budget_bytes / 1e9:.2f} GB")
    # (the tiers' capacities are not compared: what the plan's decisions use of them is, by as_this_runs_plan)
    if a.prefetch_depth != b.prefetch_depth:
        out.append(f"prefetch depth {a.prefetch_depth}, memory.prefetch_depth is {b.prefetch_depth}")
    for key, what, none in (("world", "ranks", 1), ("sharded", "sharded state", "none"),
                            ("sequence_parallel", "sequence-parallel ranks", 1), ("kernels", "kernels", "none"),
                            ("adapter", "adapters", "none")):
        ma, mb = a.meta.get(key) or none, b.meta.get(key) or none  # absent: one rank, nothing sharded, no kernels
        if ma != mb:
            words = lambda x: ", ".join(x) if isinstance(x, list) else str(x)  # noqa: E731
            out.append(f"{what}: {words(ma)}, this run has {words(mb)}")
    if not out and differ(a.head_bytes, b.head_bytes):
        out.append(f"an LM head step of {a.head_bytes / 1e9:.2f} GB, this run's is {b.head_bytes / 1e9:.2f} GB "
                   "(another loss chunk, or model.kernels.fused_ce)")
    if a.offload_activations != b.offload_activations:
        out.append("activations " + ("planned" if a.offload_activations else "kept by autograd") + ", this run "
                   + ("plans them" if b.offload_activations else "keeps them with autograd"))
    return out


