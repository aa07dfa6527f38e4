"""The schedule MILP, solved with PuLP: HiGHS (highspy) by default, CBC as the fallback.

Variables: for each layer l, class c and place p (GPU, recompute, each tier), the number of token chunks
n[l,c,p] in 0..G (a class that must go whole to one place gets binaries instead); one binary per placement
of optimizer state and weights (Problem.state_options); the arena size A; the recompute chunk's size.
Constraints and objective are evaluate.py's, built from the same description of what is alive when
(timeline.py): the GPU memory row of the head and of every backward position (kept margin_bytes() under the
budget, so the evaluator never sees the solver's tolerances), A above the live staging/prefetch bytes of
every time step, D2H of layer l behind its forward and H2D behind its prefetch window (slack = exposed
time), and tier capacities shared with the state. Bytes enter in GB to keep the numbers tame.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import pulp

from .evaluate import Decisions, margin_bytes, places
from .problem import Problem
from .timeline import ARENA_CHUNK_OVERHEAD, REGION_SLACK_BYTES, arena_live, nvme_ring_slots, gpu_rows, prefetch_window_s, staging_window_s, state_constant_s
from .vocabulary import CLASSES, GPU, RECOMPUTE

GB = 1e9


class SolverError(RuntimeError):
    pass


@dataclass
class Solution:
    decisions: Optional[Decisions]
    state: Optional[str]  # the chosen placement of optimizer state and weights (StateOption.name)
    status: str  # optimal | feasible (time limit or gap) | infeasible | error
    solver: str
    solve_s: float
    gap: Optional[float]
    objective: Optional[float]


def available_solvers() -> list[str]:
    return [s for s in ("HiGHS", "PULP_CBC_CMD") if s in pulp.listSolvers(onlyAvailable=True)]


def _solver(name: str, time_limit: float, gap: float):
    if name == "HiGHS":
        return pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=gap)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap)


class _Model:
    """The PuLP model of one Problem; `minimise_peak` solves for the smallest GPU peak instead of step time."""

    def __init__(self, problem: Problem, minimise_peak: bool = False):
        P, L, G = problem, problem.num_layers, problem.chunks
        self.problem = P
        self.prob = pulp.LpProblem("longtune_plan", pulp.LpMinimize)
        self.n: dict[tuple[int, str, str], pulp.LpAffineExpression] = {}
        tiers = {t.name: t for t in P.tiers}
        place_list = places(P)
        for l in range(L):
            for c in CLASSES:
                allowed = [p for p in place_list if p != RECOMPUTE or c in P.recompute_s]
                if c in P.all_or_nothing:
                    y = {p: pulp.LpVariable(f"y_{l}_{c}_{p}", cat="Binary") for p in allowed}
                    self.prob += pulp.lpSum(y.values()) == 1
                    for p in allowed:
                        self.n[l, c, p] = G * y[p]
                else:
                    x = {p: pulp.LpVariable(f"n_{l}_{c}_{p}", 0, G, cat="Integer") for p in allowed}
                    self.prob += pulp.lpSum(x.values()) == G
                    for p in allowed:
                        self.n[l, c, p] = 1 * x[p]
        options = P.state_options
        self.state = {o.name: pulp.LpVariable(f"state_{i}", cat="Binary") for i, o in enumerate(options)}
        if options:
            self.prob += pulp.lpSum(self.state.values()) == 1
        y_state = [(o, self.state[o.name]) for o in options]
        B = {c: P.chunk_bytes[c] / GB for c in CLASSES}

        def bytes_where(l: int, pred) -> pulp.LpAffineExpression:
            return pulp.lpSum(B[c] * v for (ll, c, p), v in self.n.items() if ll == l and pred(p))

        kept = [bytes_where(l, lambda p: p == GPU) for l in range(L)]
        # offloaded bytes as the arena holds them: each chunk with its region's alignment slack
        off = [pulp.lpSum((B[c] + ARENA_CHUNK_OVERHEAD / GB) * v for (ll, c, p), v in self.n.items() if ll == l and p in tiers)
               for l in range(L)]
        # One recomputed chunk is alive at a time; its size is the largest recomputed class's chunk. An
        # indicator per class keeps the LP relaxation tight.
        recompute = pulp.LpVariable("recompute_gb", 0)
        for c in (P.recompute_s if RECOMPUTE in place_list else ()):
            used = pulp.LpVariable(f"recomputes_{c}", cat="Binary")
            for l in range(L):
                self.prob += self.n[l, c, RECOMPUTE] <= G * used
            self.prob += recompute >= B[c] * used
        arena = pulp.LpVariable("arena_gb", 0)
        for live in arena_live(P, off):
            self.prob += arena >= live
        state_gb = [pulp.lpSum(o.gpu_at(i) / GB * y for o, y in y_state) for i in range(L + 1)]
        # A backward row holds the larger of a layer's two phases (timeline.backward_phase_bytes)
        backward_phase = pulp.LpVariable("backward_phase_gb", 0)
        self.prob += backward_phase >= P.layer_workspace_bytes / GB + recompute
        self.prob += backward_phase >= P.attention_phase_bytes / GB
        self.prob += backward_phase >= P.forward_workspace_bytes / GB
        self.rows = gpu_rows(P, kept, backward_phase, arena, state_gb, unit=1 / GB)
        if minimise_peak:
            self.peak = pulp.LpVariable("peak_gb", 0)
            for r in self.rows:
                self.prob += r <= self.peak
            self.prob += self.peak
        else:
            limit = (P.budget_bytes - margin_bytes(P.budget_bytes)) / GB
            for i, r in enumerate(self.rows):
                self.prob += r <= limit, f"gpu_row_{i}"

        recompute_s = [
            pulp.lpSum(P.recompute_s[c] * self.n[l, c, RECOMPUTE] for c in P.recompute_s if (l, c, RECOMPUTE) in self.n)
            for l in range(L)
        ]
        bwd_h2d = pulp.lpSum(o.bwd_h2d_s * y for o, y in y_state)
        exposed, link_s = [], []
        for l in range(L):
            def link(direction: str, layer: int = l) -> pulp.LpAffineExpression:
                return pulp.lpSum(
                    B[c] * GB / getattr(tiers[p], direction) * self.n[layer, c, p]
                    for c in CLASSES for p in tiers if (layer, c, p) in self.n
                )
            d2h = pulp.LpVariable(f"exposed_d2h_{l}", 0)
            h2d = pulp.LpVariable(f"exposed_h2d_{l}", 0)
            self.prob += link("from_gpu_bps") <= staging_window_s(P) + d2h
            link_s += [link("from_gpu_bps"), link("to_gpu_bps") + bwd_h2d]
            window = prefetch_window_s(P, l, [0.0] * L)  # (and the recompute of the same layers, where it hides)
            if P.overlap:
                window += pulp.lpSum(recompute_s[j] for j in range(l + 1, min(l + P.prefetch_depth, L - 1) + 1))
            self.prob += link("to_gpu_bps") + bwd_h2d <= window + h2d
            exposed += [d2h, h2d]
        ring = 0.0  # the host buffers NVMe activations pass through (timeline.nvme_ring_slots), in the host tier
        if "nvme" in tiers and "host" in tiers:
            largest = pulp.LpVariable("nvme_ring_buffer_gb", 0)
            for l in range(L):
                self.prob += largest >= pulp.lpSum((B[c] + REGION_SLACK_BYTES / GB) * self.n[l, c, "nvme"]
                                                   for c in CLASSES if (l, c, "nvme") in self.n)
            ring = nvme_ring_slots(P.prefetch_depth) * largest
        for name, tier in tiers.items():
            state_on_tier = pulp.lpSum(o.tier_bytes.get(name, 0.0) / GB * y for o, y in y_state)
            self.prob += (pulp.lpSum(B[c] * self.n[l, c, name] for l in range(L) for c in CLASSES if (l, c, name) in self.n)
                          + state_on_tier + (ring if name == "host" else 0.0)
                          <= tier.capacity_bytes / GB)
        if not minimise_peak:
            # The whole predicted step time, constant compute included, so the gap is relative to it.
            compute = L * (P.layer_fwd_s + P.layer_bwd_s) + P.head_s
            state_s = pulp.lpSum(state_constant_s(P, o) * y for o, y in y_state)
            self.prob += (compute + pulp.lpSum(recompute_s) + pulp.lpSum(exposed) + state_s
                          + P.transfer_penalty * pulp.lpSum(link_s))

    def decisions(self) -> Decisions:
        out: Decisions = []
        for l in range(self.problem.num_layers):
            layer = {}
            for c in CLASSES:
                d = {}
                for (ll, cc, p), expr in self.n.items():
                    if ll == l and cc == c:
                        count = int(round(pulp.value(expr) or 0))
                        if count:
                            d[p] = count
                layer[c] = d
            out.append(layer)
        return out

    def state_choice(self) -> Optional[str]:
        if not self.state:
            return None
        return max(self.state, key=lambda name: pulp.value(self.state[name]) or 0)


@contextlib.contextmanager
def quiet_stdout():
    """HiGHS prints a banner from C++ even with msg=False; keep stdout clean (e.g. for --json)."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _solve(model: _Model, solver: Optional[str], time_limit: float, gap: float) -> Solution:
    names = [solver] if solver else available_solvers()
    if solver and solver not in available_solvers():
        raise SolverError(f"solver {solver!r} is not available; available: {available_solvers()}")
    last_error = "no MILP solver available (install highspy, or PuLP's bundled CBC)"
    for name in names:
        start = time.perf_counter()
        try:
            with quiet_stdout():
                model.prob.solve(_solver(name, time_limit, gap))
        except pulp.PulpSolverError as e:
            last_error = f"{name}: {e}"
            continue
        elapsed = time.perf_counter() - start
        status = pulp.LpStatus[model.prob.status]
        has_solution = model.prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
        if status == "Infeasible":
            return Solution(None, None, "infeasible", name, elapsed, None, None)
        if not has_solution:
            last_error = f"{name}: {status}"
            continue
        state = "optimal" if model.prob.sol_status == pulp.LpSolutionOptimal else "feasible"
        return Solution(model.decisions(), model.state_choice(), state, name, elapsed, _gap(model),
                        pulp.value(model.prob.objective))
    raise SolverError(last_error)


def _gap(model: _Model) -> Optional[float]:
    # PuLP does not expose the solver's bound uniformly; HiGHS does through its model.
    solver_model = getattr(model.prob, "solverModel", None)
    if solver_model is not None and hasattr(solver_model, "getInfo"):
        info = solver_model.getInfo()
        return float(getattr(info, "mip_gap", 0.0)) if getattr(info, "mip_gap", None) is not None else None
    return None


def solve_schedule(problem: Problem, solver: Optional[str] = None, time_limit: float = 20.0, gap: float = 0.01) -> Solution:
    return _solve(_Model(problem), solver, time_limit, gap)


class TiersTooSmall(SolverError):
    """No plan fits whatever the GPU budget: the tiers cannot hold what must leave the GPU."""


def min_gpu_budget(problem: Problem, solver: Optional[str] = None, time_limit: float = 20.0, gap: float = 0.001) -> float:
    """The smallest GPU budget (bytes) a plan fits in, with the tiers as they are: the smallest peak plus the
    margin the schedule MILP keeps under its budget, so solving at this budget succeeds."""
    model = _Model(problem, minimise_peak=True)
    solution = _solve(model, solver, time_limit, gap)
    if solution.decisions is None:
        raise TiersTooSmall(f"no plan fits even an unlimited GPU ({solution.status}): the tiers cannot hold "
                            "the optimizer state and weights placed there")
    peak = pulp.value(model.peak) * GB
    # the budget b with b - margin_bytes(b) = peak, so solving at it succeeds
    return (peak + (1 << 20)) / (1 - 1e-5) + 1.0
