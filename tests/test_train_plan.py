"""`longtune train` with a memory plan: solved at start-up, written to the run folder, carried out, measured.

The plan's activation decisions run inside autograd (offload/activations.py) beside the optimizer state and
weights off the GPU, with gradient accumulation, bf16 autocast and the fused loss; losses are the plain run's
to fp32 rounding; a resumed run is bit for bit the uninterrupted one; metrics.jsonl carries the measured
saved-activation peak beside the plan's prediction.
"""

from __future__ import annotations

import copy

import pytest
from conftest import plan_budget_gb, read_metrics, start_cli, train_losses, write_yaml

from longtune.planner.plan import Plan
from longtune.trainer.config import validate
from longtune.trainer.train import train


@pytest.fixture
def config(tiny_config, tmp_path) -> dict:
    cfg = copy.deepcopy(tiny_config)
    cfg["model"]["config"]["num_hidden_layers"] = 3
    cfg["train"].update(max_steps=4, grad_accum_steps=2)
    cfg["data"]["passkey"]["eval_samples"] = 0
    cfg["memory"] = {"plan_chunks": 4, "nvme_path": str(tmp_path / "nvme")}
    return cfg


def _run(cfg: dict, tmp_path, name: str, **memory) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["memory"].update(memory)
    cfg["run"]["output_dir"] = str(tmp_path / name)
    train(validate(cfg))
    return train_losses(tmp_path / name)


def _places(run_dir) -> set[str]:
    plan = Plan.from_yaml((run_dir / "plan.yaml").read_text())
    return {p for layer in plan.layers for d in layer.values() for p in d}


def test_tight_plan_with_state_off_the_gpu_gives_the_plain_losses(config, tmp_path):
    plain = _run(config, tmp_path, "plain")
    state = {"optimizer": "cpu", "params": "cpu", "cpu_adam": "torch"}
    budget = plan_budget_gb({**config, "memory": {**config["memory"], **state}}, 0.0)
    planned = _run(config, tmp_path, "planned", **state, budget_gb=budget)
    assert planned.keys() == plain.keys()
    for step in plain:
        assert planned[step] == pytest.approx(plain[step], rel=1e-5), step
    assert {"recompute"} <= _places(tmp_path / "planned") and _places(tmp_path / "planned") & {"host", "nvme"}
    steps = [m for m in read_metrics(tmp_path / "planned") if "loss" in m]
    for m in steps:  # the runtime's own accounting beside the plan's prediction, every step
        assert m["mem_measured_gpu_gb"] == pytest.approx(m["mem_plan_gpu_gb"], rel=0.05)
        assert m["mem_measured_gpu_gb"] <= budget
        assert "recompute_s" in m and "offload_wait_s" in m


def test_resume_with_a_plan_is_bitwise(config, tmp_path):
    budget = plan_budget_gb(config, 0.2)
    cfg = copy.deepcopy(config)
    cfg["checkpoint"] = {"every_n_steps": 2, "keep_last": 3}
    straight = _run(cfg, tmp_path, "straight", budget_gb=budget)
    cfg["run"]["resume"] = str(tmp_path / "straight" / "step_2")
    resumed = _run(cfg, tmp_path, "resumed", budget_gb=budget)
    assert resumed == {k: v for k, v in straight.items() if k > 2}


@pytest.mark.parametrize("extra", [{"train": {"mixed_precision": "bf16"}}, {"model": {"kernels": {"fused_ce": True}}}],
                         ids=["bf16-autocast", "fused-loss"])
def test_plan_with_autocast_and_the_fused_loss(config, tmp_path, extra):
    cfg = copy.deepcopy(config)
    for section, values in extra.items():
        cfg[section] = {**cfg[section], **values}
    cfg["train"]["max_steps"] = 2
    plain = _run(cfg, tmp_path, "plain")
    planned = _run(cfg, tmp_path, "planned", budget_gb=plan_budget_gb(cfg, 0.2))
    rel = 2e-2 if "train" in extra else 1e-5  # bf16 rounding vs fp32 rounding
    for step in plain:
        assert planned[step] == pytest.approx(plain[step], rel=rel), step


def test_cli_writes_the_plan_and_prints_it(config, tmp_path):
    cfg = copy.deepcopy(config)
    cfg["train"]["max_steps"] = 1
    cfg["run"]["output_dir"] = str(tmp_path / "cli")
    path = write_yaml(tmp_path / "c.yaml", cfg)
    # Three independent runs, started together (each one's start-up is most of its time).
    runs = {"budget": [f"memory.budget_gb={plan_budget_gb(cfg, 0.3)}"],
            "auto": ["memory.budget_gb=auto", f"run.output_dir={tmp_path / 'auto'}"],
            "too_small": ["memory.budget_gb=0.001", f"run.output_dir={tmp_path / 'small'}"]}
    procs = {name: start_cli("train", path, *args) for name, args in runs.items()}
    try:
        out = {name: (*p.communicate(timeout=600), p.returncode) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    stdout, stderr, code = out["budget"]
    assert code == 0, stderr
    assert "predicted step" in stdout and "plan written to" in stdout
    assert (tmp_path / "cli" / "plan.yaml").is_file()
    _, stderr, code = out["auto"]
    assert code == 0, stderr  # auto: what this machine has free, less the margin
    _, stderr, code = out["too_small"]
    assert code == 2
    assert "no plan fits a GPU budget of 0.00 GB" in stderr and "GB missing" in stderr


def test_activations_that_autograd_keeps_are_a_warning_not_a_refusal(config):
    """Without memory.budget_gb the plan only places the state; activations that would not fit the device are
    for the user to hear about (with the fix), not a reason to refuse the run."""
    from longtune.trainer.capacities import Capacities
    from longtune.trainer.planning import plan_memory

    cfg = validate({**config, "memory": {"plan_chunks": 4}})
    fits = plan_memory(cfg, Capacities(gpu=100e9, host=64e9))
    assert fits.warnings == [] and not fits.problem.offload_activations
    tight = plan_memory(cfg, Capacities(gpu=0.12e9, host=64e9))  # the state fits, all activations would not
    assert len(tight.warnings) == 1 and "set memory.budget_gb=auto" in tight.warnings[0]
    assert tight.optimizer_tier == "gpu"
