"""What a set of decisions costs: GPU memory at every point of the step, and the step time.

This is the model the MILP optimises, as plain numbers, so it can check any plan (the solver's, a
fallback's, a brute-force enumeration's) on its own. What is alive when comes from timeline.py, which the
MILP's rows and the runtime's expected residency use as well.

Time of one step: the compute of every layer's forward and backward and of the head; the recompute of the
chunks the plan drops; link time not hidden: layer l's device-to-host copies behind its forward, its
prefetch (with the weights streamed back for its backward) behind its prefetch window; and the constant
cost of where the optimizer state and weights live (timeline.state_constant_s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .problem import Problem
from .timeline import ARENA_CHUNK_OVERHEAD, REGION_SLACK_BYTES, activation_residency, backward_phase_bytes, nvme_ring_slots, arena_live, gpu_rows, positions, prefetch_window_s, staging_window_s, state_constant_s
from .vocabulary import CLASSES, GPU, RECOMPUTE

# decisions[l][class][place] = number of chunks; place is "gpu", "recompute" or a tier name.
Decisions = list[dict[str, dict[str, int]]]


@dataclass
class Evaluation:
    step_time_s: float
    compute_s: float
    recompute_s: float
    exposed_transfer_s: float
    state_s: float  # what the placement of optimizer state and weights adds
    objective: float  # step time + the small penalty on link time
    gpu_rows: list[float]  # at timeline.positions(): [head, backward of L-1, ..., backward of 0]
    arena_bytes: float  # the staging/prefetch block, held whole
    recompute_bytes: float  # the one recomputed chunk alive at a time
    tier_bytes: dict[str, float]  # activations + state per tier
    exposed_d2h_s: list[float]
    exposed_h2d_s: list[float]
    residency: dict[str, dict[str, float]]  # timeline.activation_residency: saved activations on the device
    violations: list[str]
    link_s: float = 0.0  # every transfer's link time, hidden or not

    @property
    def gpu_peak_bytes(self) -> float:
        return max(self.gpu_rows)

    @property
    def activation_peak_bytes(self) -> float:
        """Saved activations live on the device at the worst position (kept + staging + prefetch + recompute)."""
        return max(sum(kinds.values()) for kinds in self.residency.values())

    @property
    def feasible(self) -> bool:
        return not self.violations


def places(problem: Problem) -> list[str]:
    """Where a chunk may go (only the GPU when activations are not planned: autograd keeps them all)."""
    if not problem.offload_activations:
        return [GPU]
    return [GPU, RECOMPUTE, *(t.name for t in problem.tiers)]


def check_shape(problem: Problem, decisions: Decisions) -> list[str]:
    """Structural errors: chunk counts that do not add up, forbidden places."""
    errors = []
    if len(decisions) != problem.num_layers:
        return [f"{len(decisions)} layers decided, the model has {problem.num_layers}"]
    valid = set(places(problem))
    for l, layer in enumerate(decisions):
        if not isinstance(layer, dict):
            errors.append(f"layer {l}: {layer!r} is not a mapping of activation class to places")
            continue
        for c in CLASSES:
            d = layer.get(c, {})
            if not isinstance(d, dict) or not all(isinstance(n, int) and not isinstance(n, bool) for n in d.values()):
                errors.append(f"layer {l} {c}: {d!r} is not a mapping of place to a whole number of chunks")
                continue
            if set(d) - valid:
                errors.append(f"layer {l} {c}: unknown place {sorted(set(d) - valid)}")
            if sum(d.values()) != problem.chunks or any(n < 0 for n in d.values()):
                errors.append(f"layer {l} {c}: chunks {d} do not add up to {problem.chunks}")
            if d.get(RECOMPUTE, 0) and c not in problem.recompute_s:
                errors.append(f"layer {l} {c}: cannot be recomputed")
            if c in problem.all_or_nothing and max(d.values(), default=0) != problem.chunks:
                errors.append(f"layer {l} {c}: must go whole to one place, got {d}")
    return errors


def layer_bytes(problem: Problem, decisions: Decisions, overhead: float = 0.0) -> tuple[list[float], list[float], float]:
    """(kept bytes per layer, offloaded bytes per layer, the recompute chunk's bytes); `overhead` per offloaded
    chunk (timeline.ARENA_CHUNK_OVERHEAD: the offloaded bytes as the arena holds them)."""
    B = problem.chunk_bytes
    tiers = {t.name for t in problem.tiers}
    kept = [sum(B[c] * d.get(GPU, 0) for c, d in layer.items()) for layer in decisions]
    off = [sum((B[c] + overhead) * n for c, d in layer.items() for p, n in d.items() if p in tiers)
           for layer in decisions]
    recompute = max((B[c] for c in CLASSES if any(layer[c].get(RECOMPUTE, 0) for layer in decisions)), default=0.0)
    return kept, off, recompute


# Rows may exceed the budget by this much (float rounding of sums of ~1e11 bytes). The MILP keeps its rows
# margin_bytes(budget) below the budget: HiGHS was seen to accept rows ~4e-6 GB over at a 32 GB budget
# (its tolerances apply to scaled rows), so the margin is 1 MiB + 1e-5 of the budget, and its answers pass.
TOLERANCE_BYTES = 1.0


def margin_bytes(budget_bytes: float) -> float:
    return float(1 << 20) + 1e-5 * budget_bytes


def evaluate(problem: Problem, decisions: Decisions, state: Optional[str] = None,
             arena_bytes: Optional[float] = None) -> Evaluation:
    """The plan's memory and time. `state` names the optimizer/weights placement (None: the only option);
    `arena_bytes`: the packed arena's real size (None: the live peak it is packed to, its lower bound)."""
    errors = check_shape(problem, decisions)
    if errors:
        raise ValueError("; ".join(errors))
    option = problem.state(state)
    B, L = problem.chunk_bytes, problem.num_layers
    kept, off, recompute = layer_bytes(problem, decisions)
    live = arena_live(problem, layer_bytes(problem, decisions, ARENA_CHUNK_OVERHEAD)[1])
    arena = max(live) if arena_bytes is None else arena_bytes
    rows = gpu_rows(problem, kept, backward_phase_bytes(problem, recompute), arena, [option.gpu_at(i) for i in range(L + 1)] if option else 0.0)

    recompute_per_layer = [
        sum(problem.recompute_s[c] * d.get(RECOMPUTE, 0) for c, d in layer.items() if c in problem.recompute_s)
        for layer in decisions
    ]
    tiers = {t.name: t for t in problem.tiers}

    def link_time(l: int, direction: str) -> float:
        return sum(
            B[c] * n / getattr(tiers[p], direction)
            for c, d in decisions[l].items() for p, n in d.items() if p in tiers
        )

    out_s = [link_time(l, "from_gpu_bps") for l in range(L)]
    in_s = [link_time(l, "to_gpu_bps") + (option.bwd_h2d_s if option else 0.0) for l in range(L)]
    d2h = [max(0.0, out_s[l] - staging_window_s(problem)) for l in range(L)]
    h2d = [max(0.0, in_s[l] - prefetch_window_s(problem, l, recompute_per_layer)) for l in range(L)]
    compute = L * (problem.layer_fwd_s + problem.layer_bwd_s) + problem.head_s
    recompute_total = sum(recompute_per_layer)
    exposed = sum(d2h) + sum(h2d)
    state_s = state_constant_s(problem, option)
    link_s = sum(out_s) + sum(in_s)
    tier_bytes = {
        name: sum(B[c] * d.get(name, 0) for layer in decisions for c, d in layer.items())
        + (option.tier_bytes.get(name, 0.0) if option else 0.0)
        for name in tiers
    }
    if "nvme" in tiers and "host" in tiers:
        tier_bytes["host"] += nvme_ring_slots(problem.prefetch_depth) * max(
            sum((B[c] + REGION_SLACK_BYTES) * d.get("nvme", 0) for c, d in layer.items()) for layer in decisions)
    violations = []
    if max(rows) > problem.budget_bytes + TOLERANCE_BYTES:
        worst = positions(L)[rows.index(max(rows))]
        violations.append(f"GPU peak {max(rows) / 1e9:.3f} GB (at {worst}) over the budget {problem.budget_bytes / 1e9:.3f} GB")
    for name, used in tier_bytes.items():
        if used > tiers[name].capacity_bytes + TOLERANCE_BYTES:
            violations.append(f"{name} holds {used / 1e9:.3f} GB, capacity {tiers[name].capacity_bytes / 1e9:.3f} GB")
    step = compute + recompute_total + exposed + state_s
    return Evaluation(
        step_time_s=step,
        compute_s=compute,
        recompute_s=recompute_total,
        exposed_transfer_s=exposed,
        state_s=state_s,
        objective=step + problem.transfer_penalty * link_s,
        gpu_rows=rows,
        arena_bytes=arena,
        recompute_bytes=recompute,
        tier_bytes=tier_bytes,
        exposed_d2h_s=d2h,
        exposed_h2d_s=h2d,
        residency=activation_residency(problem, kept, off, [
            max((B[c] for c, d in layer.items() if d.get(RECOMPUTE, 0)), default=0.0) for layer in decisions]),
        violations=violations,
        link_s=link_s,
    )
