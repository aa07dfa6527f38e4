"""The plan's predicted step time rides beside the measured one in every logged step (issue 25)."""

from __future__ import annotations

import pytest
import torch

from longtune.offload.runtime import MemoryRuntime, RuntimeOptions
from longtune.planner.plan import plan_of
from longtune.trainer.metrics import format_line

from test_activation_runtime import G, SEQ, build, problem, tiny, uniform


def test_time_plan_s_is_the_plans_micro_batches_and_state_once(tmp_path):
    """Two micro-batches: twice the plan's compute, recompute and exposed transfer, and the state's time once."""
    cfg = tiny("llama")
    model = build(cfg)
    plan = plan_of(problem(cfg), uniform(2, input={"host": G}, post={"recompute": G}))
    runtime = MemoryRuntime(model, plan, RuntimeOptions(torch.device("cpu"), activations=True,
                                                        nvme_path=str(tmp_path / "nvme")))
    try:
        ids = torch.randint(0, 256, (1, SEQ))
        with runtime.step(2):
            for _ in range(2):
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        got = runtime.memory_metrics()
    finally:
        runtime.close()
    p = plan.predicted
    assert p["recompute_s"] > 0 and p["compute_s"] > 0
    assert got["time_plan_s"] == pytest.approx(2 * (p["compute_s"] + p["recompute_s"] + p["exposed_transfer_s"])
                                               + p["state_s"])
    assert got["recompute_plan_s"] == pytest.approx(2 * p["recompute_s"])
    assert got["recompute_s"] > 0  # measured beside it
    # by part: only post is recomputed here; the parts sum to the whole, measured and planned
    assert got["recompute_plan_post_s"] == pytest.approx(got["recompute_plan_s"]) and got["recompute_plan_pre_s"] == 0
    assert got["recompute_post_s"] == pytest.approx(got["recompute_s"]) and got["recompute_pre_s"] == 0
    assert "plan 1.50 s" in format_line({"step": 3, "step_time_s": 1.4, "time_plan_s": 1.5})
