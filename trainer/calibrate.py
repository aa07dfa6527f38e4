"""`longtune probe --config`: the compute of a config's step as the runtime runs it, at two lengths.

A kernel microbenchmark prices FLOPs at the best GEMM's rate; a step runs narrower matmuls, norms, activations,
the loss, and the activation runtime's token chunks (smaller GEMMs, attention in blocks, their merges). So the
config itself is trained for two steps at each length with a plan that keeps everything on the device, and the
second step, less what the plan prices apart (the optimizer step), is the compute the planner's rates are fitted
to (planner/problem.fitted_rates).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from longtune.planner.plan import Plan

from .config import Config, validate


def step_compute_seconds(cfg: Config, lengths: tuple[int, ...], machine: str, budget_gb: float,
                         log: Callable[[str], None] = print) -> dict[int, float]:
    """{tokens: seconds of the timed step's forward and backward}, the config trained at each length with the
    profile `machine`, the optimizer and weights on the device and a `budget_gb` that keeps every activation."""
    from .train import train

    seconds = {}
    for n in lengths:
        with tempfile.TemporaryDirectory(prefix="longtune-probe-") as tmp:
            data = cfg.model_dump(mode="json")
            data["data"]["seq_len"] = n
            if data["data"].get("passkey"):
                data["data"]["passkey"]["eval_samples"] = 0
            data["train"].update(max_steps=2, warmup_steps=0, grad_accum_steps=1, micro_batch_size=1)
            data["memory"].update(budget_gb=budget_gb, machine=machine, optimizer="gpu", params="gpu", plan="auto")
            data["checkpoint"].update(every_n_steps=0, save_final=False)
            data["run"].update(output_dir=str(Path(tmp) / "run"), resume=None)
            data["log"].update(every_n_steps=1, sinks=["jsonl"])
            run = validate(data)
            train(run)
            step = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
            last = [m for m in step if "loss" in m][-1]
            predicted = Plan.from_yaml((Path(tmp) / "run" / "plan.yaml").read_text()).predicted
            apart = sum(predicted.get(k) or 0.0 for k in ("state_s", "exposed_transfer_s", "recompute_s"))
            seconds[n] = last["step_time_s"] - apart
        log(f"  {n:,} tokens: the runtime's step {last['step_time_s']:.3f} s, of it forward and backward {seconds[n]:.3f} s")
    return seconds
