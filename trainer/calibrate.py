"""`longtune probe --config`: the compute of a config's step as the runtime runs it, at two lengths, and its recompute.

A kernel microbenchmark prices FLOPs at the best GEMM's rate; a step runs narrower matmuls, norms, activations,
the loss, and the activation runtime's token chunks (smaller GEMMs, attention in blocks, their merges). So the
config itself is trained for two steps at each length with a plan that keeps everything on the device, and the
second step, less what the plan prices apart (the optimizer step), is the compute the planner's rates are fitted
to (planner/problem.fitted_rates). A recompute is a forward alone, in chunks; at those rates it takes longer than
its FLOPs say, so the shorter length is trained once more with every chunk's pre and post parts recomputed, and
the runtime's timing of each part against its price is the profile's recompute factor.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable, Optional

from longtune.planner.plan import Plan
from longtune.planner.vocabulary import GPU, RECOMPUTE

from .config import Config, validate


def _train(cfg: Config, tokens: int, machine: str, budget_gb: float, plan: Optional[Plan] = None) -> tuple[dict, Plan]:
    """The timed (second) step's metrics of the config trained two steps at `tokens`, the optimizer and weights on
    the device, with `plan` (None: the planner's, which keeps everything within a budget this large); and the plan
    it ran."""
    from .train import train

    with tempfile.TemporaryDirectory(prefix="longtune-probe-") as tmp:
        data = cfg.model_dump(mode="json")
        data["data"]["seq_len"] = tokens
        if data["data"].get("passkey"):
            data["data"]["passkey"]["eval_samples"] = 0
        data["train"].update(max_steps=2, warmup_steps=0, grad_accum_steps=1, micro_batch_size=1)
        data["memory"].update(budget_gb=budget_gb, machine=machine, optimizer="gpu", params="gpu", plan="auto")
        if plan is not None:
            (Path(tmp) / "plan.yaml").write_text(plan.to_yaml())
            data["memory"]["plan"] = str(Path(tmp) / "plan.yaml")
        data["checkpoint"].update(every_n_steps=0, save_final=False)
        data["run"].update(output_dir=str(Path(tmp) / "run"), resume=None)
        data["log"].update(every_n_steps=1, sinks=["jsonl"])
        train(validate(data))
        metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        return [m for m in metrics if "loss" in m][-1], Plan.from_yaml((Path(tmp) / "run" / "plan.yaml").read_text())


def step_compute_seconds(cfg: Config, lengths: tuple[int, ...], machine: str, budget_gb: float,
                         log: Callable[[str], None] = print) -> tuple[dict[int, float], dict[int, Plan]]:
    """({tokens: seconds of the timed step's forward and backward}, {tokens: the plan it ran}), the config trained
    at each length with the profile `machine`, the optimizer and weights on the device and a `budget_gb` that keeps
    every activation. A step's time per token grows with the length (attention); where the shorter length's does
    not come out below the longer's, something else most likely ran on the machine meanwhile (measured: 18.96 s
    at 512 tokens against 12.57 s at 2,048 on a busy machine, 2.54 s on a quiet one), so both are timed once more
    and each keeps its faster time (a busy machine only slows a step down)."""
    def time_all() -> tuple[dict[int, float], dict[int, Plan]]:
        seconds, plans = {}, {}
        for n in lengths:
            last, plans[n] = _train(cfg, n, machine, budget_gb)
            apart = sum(plans[n].predicted.get(k) or 0.0 for k in ("state_s", "exposed_transfer_s", "recompute_s"))
            seconds[n] = last["step_time_s"] - apart
            log(f"  {n:,} tokens: the runtime's step {last['step_time_s']:.3f} s, of it forward and backward "
                f"{seconds[n]:.3f} s")
        return seconds, plans

    seconds, plans = time_all()
    if not per_token_grows(seconds):
        log("  the shorter length's step took as long per token as the longer's or longer (a busy machine?): "
            "timing both again ...")
        again, _ = time_all()
        seconds = {n: min(s, again[n]) for n, s in seconds.items()}
    return seconds, plans


def per_token_grows(seconds: dict[int, float]) -> bool:
    """Whether a step's time per token grows with its length, {tokens: seconds} (attention's T^2 shows)."""
    per_token = [s / n for n, s in sorted(seconds.items())]
    return all(a < b for a, b in zip(per_token, per_token[1:]))


def recompute_factors(cfg: Config, kept: Plan, machine: str, budget_gb: float,
                      log: Callable[[str], None] = print) -> dict[str, float]:
    """{part: the runtime's recompute of it / its price}, part pre and post: the plan `kept` (everything kept, at its
    length) run again with every chunk's pre and post parts recomputed, on the profile `machine` (its factors 1)."""
    every = [{c: ({RECOMPUTE: n} if c in kept.problem.recompute_s else {GPU: n})
              for c, d in layer.items() for n in [sum(d.values())]} for layer in kept.layers]
    last, plan = _train(cfg, kept.problem.meta["tokens"], machine, budget_gb,
                        Plan(kept.problem, every, {}, {}, [], None, kept.state))
    factors = {part: last[f"recompute_{part}_s"] / last[f"recompute_plan_{part}_s"] for part in plan.problem.recompute_s}
    log(f"  {plan.problem.meta['tokens']:,} tokens, every chunk recomputed: the step {last['step_time_s']:.3f} s; "
        + ", ".join(f"{part} recomputed in {last[f'recompute_{part}_s']:.3f} s, {factors[part]:.2f}x its price"
                    for part in factors))
    return factors
