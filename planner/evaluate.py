"""What a set of decisions costs: GPU memory at every point of the step, and the step time.

This is the model the MILP optimises, written as plain loops so it can check
any plan (the solver's, a fallback's, a brute-force enumeration's) on its own.

Timeline of one step, for layers 0..L-1:
  forward  l: compute; the D2H copy of layer l's offloaded chunks overlaps it.
  head:       LM head + loss; the prefetch (H2D) of layer L-1 overlaps it.
  backward l: recompute l's recomputed chunks, then its backward; the prefetch
              of layer l-1 overlaps both.
GPU memory during backward of layer j: fixed + workspace + kept chunks of
layers 0..j + offloaded chunks of j (in use) and j-1 (arriving) + one chunk of
each class that any layer recomputes (recompute and backward of the token-wise
parts go chunk by chunk, so one recomputed chunk is alive at a time, in a
buffer reserved for the whole step). At the head: fixed + head workspace + every kept chunk
+ layer L-1's offloaded chunks twice (its staging buffer still draining, its
prefetch buffer filling). Rows for the forward pass are
implied by these (fewer kept chunks, the same staging).
"""

from __future__ import annotations

from dataclasses import dataclass

from .problem import CLASSES, Problem

GPU, RECOMPUTE = "gpu", "recompute"
# decisions[l][class][place] = number of chunks; place is "gpu", "recompute" or a tier name.
Decisions = list[dict[str, dict[str, int]]]


@dataclass
class Evaluation:
    step_time_s: float
    compute_s: float
    recompute_s: float
    exposed_transfer_s: float
    objective: float  # step time + the small penalty on link time
    gpu_rows: list[float]  # [head, backward of L-1, ..., backward of 0]
    tier_bytes: dict[str, float]
    exposed_d2h_s: list[float]
    exposed_h2d_s: list[float]
    violations: list[str]

    @property
    def gpu_peak_bytes(self) -> float:
        return max(self.gpu_rows)

    @property
    def feasible(self) -> bool:
        return not self.violations


def places(problem: Problem) -> list[str]:
    return [GPU, RECOMPUTE, *(t.name for t in problem.tiers)]


def check_shape(problem: Problem, decisions: Decisions) -> list[str]:
    """Structural errors: chunk counts that do not add up, forbidden places."""
    errors = []
    if len(decisions) != problem.num_layers:
        return [f"{len(decisions)} layers decided, the model has {problem.num_layers}"]
    valid = set(places(problem))
    for l, layer in enumerate(decisions):
        for c in CLASSES:
            d = layer.get(c, {})
            if set(d) - valid:
                errors.append(f"layer {l} {c}: unknown place {sorted(set(d) - valid)}")
            if sum(d.values()) != problem.chunks or any(n < 0 for n in d.values()):
                errors.append(f"layer {l} {c}: chunks {d} do not add up to {problem.chunks}")
            if d.get(RECOMPUTE, 0) and c not in problem.recompute_s:
                errors.append(f"layer {l} {c}: cannot be recomputed")
            if c in problem.all_or_nothing and max(d.values(), default=0) != problem.chunks:
                errors.append(f"layer {l} {c}: must go whole to one place, got {d}")
    return errors


def evaluate(problem: Problem, decisions: Decisions) -> Evaluation:
    errors = check_shape(problem, decisions)
    if errors:
        raise ValueError("; ".join(errors))
    B, L = problem.chunk_bytes, problem.num_layers

    def bytes_at(layer: int, place_filter) -> float:
        if layer < 0:
            return 0.0
        return sum(B[c] * n for c, d in decisions[layer].items() for p, n in d.items() if place_filter(p))

    def kept(l: int) -> float:
        return bytes_at(l, lambda p: p == GPU)

    def offloaded(l: int) -> float:
        return bytes_at(l, lambda p: p not in (GPU, RECOMPUTE))

    recompute_buffers = sum(B[c] for c in CLASSES if any(layer[c].get(RECOMPUTE, 0) for layer in decisions))

    base = problem.fixed_total + problem.layer_workspace_bytes
    kept_prefix = [0.0]
    for l in range(L):
        kept_prefix.append(kept_prefix[-1] + kept(l))
    # At the head, layer L-1's offloaded chunks are both leaving (staging) and coming back (prefetch).
    rows = [problem.fixed_total + problem.head_bytes + kept_prefix[L] + 2 * offloaded(L - 1)]
    for j in reversed(range(L)):
        rows.append(base + kept_prefix[j + 1] + offloaded(j) + offloaded(j - 1) + recompute_buffers)

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
    in_s = [link_time(l, "to_gpu_bps") for l in range(L)]
    d2h = [max(0.0, out_s[l] - problem.layer_fwd_s) for l in range(L)]
    h2d = []
    for l in range(L):
        window = problem.head_s if l == L - 1 else problem.layer_bwd_s + recompute_per_layer[l + 1]
        h2d.append(max(0.0, in_s[l] - window))
    compute = L * (problem.layer_fwd_s + problem.layer_bwd_s) + problem.head_s
    recompute = sum(recompute_per_layer)
    exposed = sum(d2h) + sum(h2d)
    link_s = sum(out_s) + sum(in_s)
    tier_bytes = {
        name: sum(B[c] * d.get(name, 0) for layer in decisions for c, d in layer.items()) for name in tiers
    }
    violations = []
    if max(rows) > problem.budget_bytes * (1 + 1e-9):
        violations.append(f"GPU peak {max(rows) / 1e9:.3f} GB over the budget {problem.budget_bytes / 1e9:.3f} GB")
    for name, used in tier_bytes.items():
        if used > tiers[name].capacity_bytes * (1 + 1e-9):
            violations.append(f"{name} holds {used / 1e9:.3f} GB, capacity {tiers[name].capacity_bytes / 1e9:.3f} GB")
    step = compute + recompute + exposed
    return Evaluation(
        step_time_s=step,
        compute_s=compute,
        recompute_s=recompute,
        exposed_transfer_s=exposed,
        objective=step + problem.transfer_penalty * link_s,
        gpu_rows=rows,
        tier_bytes=tier_bytes,
        exposed_d2h_s=d2h,
        exposed_h2d_s=h2d,
        violations=violations,
    )
