"""`longtune plan --longest`: the longest data.seq_len whose plan fits, searched with the planner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from longtune.planner.plan import Plan, PlanInfeasible
from longtune.planner.problem import Machine

from .capacities import profile_capacities
from .config import Config
from .layout import ParallelLayout
from .planning import plan_memory

MAX_SEARCHED_TOKENS = 1 << 34
SEARCH_STEP_TOKENS = 1024  # per sequence-parallel rank


@dataclass
class Longest:
    """The longest context found, its plan, and why the next length (one search step more) does not fit."""

    seq_len: int
    plan: Optional[Plan]
    next_failure: Optional[str] = None  # the planner's refusal one step longer (what is missing where)
    placement: str = ""  # which memory.optimizer / memory.params the search ran with

    @property
    def state_placement(self) -> str:
        """Where the plan put the optimizer state and the weights."""
        if self.plan is None:
            return "none"
        return f"optimizer state on {self.plan.optimizer_tier}, weights on {self.plan.params_tier}"


def longest_over_placements(cfg: Config, machine: Machine, world: int, on_probe=None,
                            solved: Optional[dict[int, Optional[Plan]]] = None) -> list[Longest]:
    """The longest context with the config's memory.optimizer / memory.params (first) and, unless those are both
    auto already, with the solver placing the state (auto, auto): a length the config's placement cannot reach
    may fit with the optimizer state or the weights on the host or NVMe. Then, where a plan found offloads
    activations (it has an arena), the widest of those with memory.prefetch_depth=0 (one layer's buffers)."""
    own = f"memory.optimizer={cfg.memory.optimizer} memory.params={cfg.memory.params}"
    found = [longest_context(cfg, machine, world, on_probe, solved)]
    found[0].placement = own
    # (FSDP2 and DeepSpeed hold the state themselves: memory.optimizer / params are not theirs to move)
    widest, words = cfg, own
    if (cfg.memory.optimizer, cfg.memory.params) != ("auto", "auto") and not ParallelLayout.of(cfg, world).strategy_owns_state:
        widest = cfg.model_copy(update={"memory": cfg.memory.model_copy(update={"optimizer": "auto", "params": "auto"})})
        words = "memory.optimizer=auto memory.params=auto"
        found.append(longest_context(widest, machine, world, on_probe))
        found[-1].placement = words
    # Prefetch depth 0: a layer's offloaded activations come back when its own backward starts, so the device holds
    # one layer's staging/prefetch buffers instead of two, and the step waits for those copies (the plan prices it)
    if cfg.memory.prefetch_depth > 0 and any(f.plan is not None and f.plan.arena is not None and f.plan.arena.size_bytes
                                             for f in found):
        shallow = widest.model_copy(update={"memory": widest.memory.model_copy(update={"prefetch_depth": 0})})
        found.append(longest_context(shallow, machine, world, on_probe))
        found[-1].placement = f"{words} memory.prefetch_depth=0"
    return found


def longest_context(cfg: Config, machine: Machine, world: int, on_probe=None,
                    solved: Optional[dict[int, Optional[Plan]]] = None) -> Longest:
    """The longest data.seq_len whose plan fits one rank of `world` on `machine` (the profile's capacities, as
    `longtune plan` spends them), searched in steps of 1024 tokens per sequence-parallel rank: doubling from the
    config's length, then bisecting. The model's position limit is not a memory limit: it is lifted here.
    on_probe(seq_len, fits) is called after each solve. `solved`: lengths already planned (None: infeasible), not
    solved again. Returns the length (0 if none fits), its plan, and why one step more does not fit."""
    unit = SEARCH_STEP_TOKENS * cfg.parallel.sequence_parallel
    failures: dict[int, str] = {}

    def plan_at(n: int) -> Optional[Plan]:
        if solved is not None and n in solved:
            return solved[n]
        model = cfg.model.model_copy(update={"max_position_embeddings": max(n, cfg.model.max_position_embeddings or 0)})
        at = cfg.model_copy(update={"data": cfg.data.model_copy(update={"seq_len": n}), "model": model})
        try:
            plan = plan_memory(at, profile_capacities(at, machine, world), machine, activations=True, world=world)
        except PlanInfeasible as e:
            plan, failures[n] = None, str(e)
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
            return Longest(lo, lo_plan)
    while hi - lo > unit:
        mid = (lo + hi) // 2 // unit * unit
        if mid <= lo:
            break
        plan = plan_at(mid)
        if plan is None:
            hi = mid
        else:
            lo, lo_plan = mid, plan
    if hi not in failures and solved is not None:  # given as infeasible: solve it here for the reason
        solved = {k: v for k, v in solved.items() if k != hi}
        plan_at(hi)
    return Longest(lo, lo_plan, failures.get(hi))
