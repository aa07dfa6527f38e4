"""The schedule MILP, solved with PuLP: HiGHS (highspy) by default, CBC as the fallback.

Variables: for each layer l, class c and place p (GPU, recompute, each tier), the
number of token chunks n[l,c,p] in 0..G; a class that must go whole to one place
gets binaries instead. Constraints and objective are those of evaluate.py: the
GPU memory row of the head and of every backward position, D2H of layer l
behind its forward and H2D of layer l behind layer l+1's backward (slack =
exposed time), and tier capacities. Bytes enter in GB to keep the numbers tame.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import pulp

from .evaluate import GPU, RECOMPUTE, Decisions, places
from .problem import CLASSES, Problem

GB = 1e9


class SolverError(RuntimeError):
    pass


@dataclass
class Solution:
    decisions: Optional[Decisions]
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
    """The PuLP model of one Problem; `objective` picks step time or GPU peak."""

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
        B = {c: P.chunk_bytes[c] / GB for c in CLASSES}

        def bytes_where(l: int, pred) -> pulp.LpAffineExpression:
            if l < 0:
                return pulp.LpAffineExpression()
            return pulp.lpSum(B[c] * v for (ll, c, p), v in self.n.items() if ll == l and pred(p))

        kept = [bytes_where(l, lambda p: p == GPU) for l in range(L)]
        off = [bytes_where(l, lambda p: p in tiers) for l in range(L)]
        # One recomputed chunk per class is alive at a time. Its buffer is reserved in every row once
        # any layer recomputes that class: one indicator per class keeps the LP relaxation tight.
        reserve = []
        for c in P.recompute_s:
            used = pulp.LpVariable(f"recomputes_{c}", cat="Binary")
            for l in range(L):
                self.prob += self.n[l, c, RECOMPUTE] <= G * used
            reserve.append(B[c] * used)
        rc = [pulp.lpSum(reserve)] * L
        recompute_s = [
            pulp.lpSum(P.recompute_s[c] * self.n[l, c, RECOMPUTE] for c in P.recompute_s) for l in range(L)
        ]

        rows = [(P.fixed_total + P.head_bytes) / GB + pulp.lpSum(kept) + 2 * off[L - 1]]
        base = (P.fixed_total + P.layer_workspace_bytes) / GB
        for j in reversed(range(L)):
            prev = off[j - 1] if j > 0 else 0
            rows.append(base + pulp.lpSum(kept[: j + 1]) + off[j] + prev + rc[j])
        self.rows = rows
        if minimise_peak:
            self.peak = pulp.LpVariable("peak_gb", 0)
            for r in rows:
                self.prob += r <= self.peak
            self.prob += self.peak
        else:
            for i, r in enumerate(rows):
                self.prob += r <= P.budget_bytes / GB, f"gpu_row_{i}"

        exposed, link_s = [], []
        for l in range(L):
            def link(direction: str, layer: int = l) -> pulp.LpAffineExpression:
                return pulp.lpSum(
                    B[c] * GB / getattr(tiers[p], direction) * self.n[layer, c, p]
                    for c in CLASSES for p in tiers
                )
            d2h = pulp.LpVariable(f"exposed_d2h_{l}", 0)
            h2d = pulp.LpVariable(f"exposed_h2d_{l}", 0)
            self.prob += link("from_gpu_bps") <= P.layer_fwd_s + d2h
            link_s += [link("from_gpu_bps"), link("to_gpu_bps")]
            window = P.head_s if l == L - 1 else P.layer_bwd_s + recompute_s[l + 1]
            self.prob += link("to_gpu_bps") <= window + h2d
            exposed += [d2h, h2d]
        for name, tier in tiers.items():
            self.prob += pulp.lpSum(B[c] * self.n[l, c, name] for l in range(L) for c in CLASSES) <= tier.capacity_bytes / GB
        if not minimise_peak:
            # The whole predicted step time, constant compute included, so the gap is relative to it.
            compute = L * (P.layer_fwd_s + P.layer_bwd_s) + P.head_s
            self.prob += compute + pulp.lpSum(recompute_s) + pulp.lpSum(exposed) + P.transfer_penalty * pulp.lpSum(link_s)

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


@contextlib.contextmanager
def _quiet_stdout():
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
            with _quiet_stdout():
                model.prob.solve(_solver(name, time_limit, gap))
        except pulp.PulpSolverError as e:
            last_error = f"{name}: {e}"
            continue
        elapsed = time.perf_counter() - start
        status = pulp.LpStatus[model.prob.status]
        has_solution = model.prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
        if status == "Infeasible":
            return Solution(None, "infeasible", name, elapsed, None, None)
        if not has_solution:
            last_error = f"{name}: {status}"
            continue
        state = "optimal" if model.prob.sol_status == pulp.LpSolutionOptimal else "feasible"
        return Solution(model.decisions(), state, name, elapsed, _gap(model), pulp.value(model.prob.objective))
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


def min_gpu_budget(problem: Problem, solver: Optional[str] = None, time_limit: float = 20.0, gap: float = 0.001) -> float:
    """The smallest GPU budget (bytes) any plan fits in, with the tiers as they are."""
    model = _Model(problem, minimise_peak=True)
    solution = _solve(model, solver, time_limit, gap)
    if solution.decisions is None:
        raise SolverError(f"no plan fits even an unlimited GPU ({solution.status})")
    return pulp.value(model.peak) * GB
