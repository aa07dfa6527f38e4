"""A plan as a table a person reads: runs of identical layers folded, bytes per tier, the binding limits."""

from __future__ import annotations

from .plan import Plan
from .vocabulary import CLASSES, GPU, RECOMPUTE


def _cell(decision: dict[str, int], chunks: int) -> str:
    if len(decision) == 1:
        return next(iter(decision))
    order = [GPU, RECOMPUTE] + sorted(p for p in decision if p not in (GPU, RECOMPUTE))
    return " ".join(f"{p} {decision[p]}" for p in order if decision.get(p))


def layer_runs(plan: Plan) -> list[tuple[int, int, dict]]:
    """(first, last, decisions) for each run of consecutive layers with identical decisions."""
    runs: list[tuple[int, int, dict]] = []
    for l, layer in enumerate(plan.layers):
        if runs and runs[-1][2] == layer:
            runs[-1] = (runs[-1][0], l, layer)
        else:
            runs.append((l, l, layer))
    return runs


def format_plan(plan: Plan) -> str:
    P, pred = plan.problem, plan.predicted
    tokens = P.meta.get("tokens")
    lines = [
        f"plan: {P.num_layers} layers, {tokens:,} tokens in {P.chunks} chunks per activation class, "
        f"machine {P.meta.get('machine')}, GPU budget {P.budget_bytes / 1e9:.2f} GB"
        + (f", per rank of {P.meta['world']} (each holds 1/{P.meta['world']} of: "
           f"{', '.join(P.meta['sharded']) or 'nothing, data parallel'})" if P.meta.get("world", 1) > 1 else ""),
        "",
    ]
    header = ["layers", *CLASSES]
    rows = [[f"{a}" if a == b else f"{a}-{b}", *(_cell(layer[c], P.chunks) for c in CLASSES)] for a, b, layer in layer_runs(plan)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())
    lines.append(f"(counts are chunks of {P.chunks}; a single name means all chunks go there)")
    lines.append("")
    lines.append(
        f"predicted step {pred['step_time_s']:.3f} s = compute {pred['compute_s']:.3f} + recompute {pred['recompute_s']:.3f} "
        f"+ exposed transfer {pred['exposed_transfer_s']:.3f}" + (f" + state {pred['state_s']:.3f}" if pred.get("state_s") else "")
        + (f"  ({pred['tokens_per_s']:,.0f} tokens/s)" if pred.get("tokens_per_s") else "")
    )
    peaks = pred["peak_bytes"]
    lines.append(
        f"peak memory: gpu {peaks['gpu'] / 1e9:.2f} GB (fixed {pred['gpu_fixed_bytes'] / 1e9:.2f} GB, saved activations "
        f"{pred.get('activation_peak_bytes', 0) / 1e9:.2f} GB)"
        + "".join(f" | {k} {v / 1e9:.2f} GB" for k, v in peaks.items() if k != "gpu")
    )
    option = plan.state_option
    if option is not None:
        where = {"gpu": "the GPU", "cpu": "host RAM", "nvme": "NVMe"}
        held = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in option.gpu_bytes.items())
        lines.append(f"optimizer state on {where[option.optimizer]}, decoder weights on {where[option.params]}"
                     + (f" (+{pred['state_s']:.3f} s a step)" if pred.get("state_s") else "") + f"; on the GPU: {held}")
    lines.append("binding: " + ("; ".join(plan.binding) if plan.binding else "nothing (the budget has room to spare)"))
    s = plan.solver
    gap = f", gap {s['gap']:.2%}" if s.get("gap") is not None else ""
    lines.append(f"solver: {s['name']} {s['status']} in {s['solve_s']:.2f} s{gap}" + (f" ({s['note']})" if s.get("note") else ""))
    if plan.arena is not None:
        a = plan.arena
        lines.append(
            f"buffer arena: {a.size_bytes / 1e9:.3f} GB for the runtime's staging/prefetch buffers "
            f"(lower bound {a.lower_bound_bytes / 1e9:.3f} GB, {a.method})"
        )
    return "\n".join(lines)
