"""`longtune probe` measures this machine through the tiers' own paths and writes a profile the planner reads."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import run_cli, write_yaml

from longtune.planner.problem import Machine


def test_probe_writes_a_profile_the_planner_loads(tmp_path, tiny_config):
    out = tmp_path / "machine.yaml"
    result = run_cli("probe", "--out", out, "--nvme-path", tmp_path / "nvme", "--size-mb", 32, "--emulate-cxl-gbps", 1,
                     "--nvme-backend", "threads")
    assert result.returncode == 0, result.stderr
    assert "cxl (emulated)" in result.stdout and f"machine profile written to {out}" in result.stdout
    profile = yaml.safe_load(out.read_text())
    host, nvme, cxl = (profile["tiers"][name] for name in ("host", "nvme", "cxl"))
    assert host["to_gpu_gbps"] > 0 and host["capacity_gb"] > 0 and host["numa_nodes"] == [0]
    assert nvme["write_gbps"] > 0 and nvme["read_gbps"] > 0 and nvme["backend"] == "threads"
    assert nvme["to_gpu_gbps"] <= min(nvme["read_gbps"], host["to_gpu_gbps"])
    assert cxl["emulated"] is True and 0 < cxl["to_gpu_gbps"] <= 1.05  # the cap holds
    assert not list((tmp_path / "nvme").iterdir())  # the probe's files are gone
    machine = Machine.load(str(out))
    assert {t.name for t in machine.tiers} == {"host", "nvme"}  # an emulated CXL tier has no capacity to plan with
    assert machine.bf16_flops > 0 and 0 < machine.attention_efficiency <= 1
    config = write_yaml(tmp_path / "c.yaml", tiny_config)
    plan = run_cli("plan", config, "--machine", out, "--out", tmp_path / "plan.yaml")
    assert plan.returncode in (0, 3), plan.stderr  # a CPU's memory may not fit; the profile itself is valid


def test_probe_rejects_a_tiny_working_set(tmp_path):
    result = run_cli("probe", "--out", tmp_path / "m.yaml", "--size-mb", 1)
    assert result.returncode == 2
    assert "--size-mb must be at least 16" in result.stderr


def test_probe_config_times_the_model_and_the_plan_predicts_its_step(tmp_path, tiny_config):
    """`longtune probe --config`: the config's model timed at two lengths; a plan made with the profile
    predicts (compute, nothing offloaded or recomputed) the step time measured at the longer length. The shorter
    is run again with everything recomputed: the recompute's factors, which the planner's prices carry."""
    config = write_yaml(tmp_path / "c.yaml", {**tiny_config, "data": {**tiny_config["data"], "seq_len": 2048}})
    out = tmp_path / "machine.yaml"
    result = run_cli("probe", "--out", out, "--size-mb", 16, "--config", config, "--lengths", "256,2048")
    assert result.returncode == 0, result.stderr
    gpu = yaml.safe_load(out.read_text())["gpu"]
    measured = gpu["calibrated"]["step_s"]["2048"]
    assert 0 < gpu["matmul_efficiency"] <= 1 and 0 < gpu["attention_efficiency"] <= 1
    plan = run_cli("plan", config, "--machine", out, "--json")
    assert plan.returncode == 0, plan.stderr
    predicted = json.loads(plan.stdout)["predicted"]["compute_s"]
    assert predicted == pytest.approx(measured, rel=0.01)  # the profile's figures are rounded to 4 digits
    factors = gpu["recompute_factor"]
    assert set(factors) == {"pre", "post"} and all(f > 0 for f in factors.values())
    assert "every chunk recomputed" in result.stdout
    from longtune.planner.problem import Machine
    machine = Machine.load(str(out))
    assert (machine.pre_recompute_factor, machine.post_recompute_factor) == (factors["pre"], factors["post"])
    bad = run_cli("probe", "--out", out, "--config", config, "--lengths", "256,300")
    assert bad.returncode == 2 and "--lengths takes two token counts" in bad.stderr


def test_a_shorter_step_slower_per_token_than_the_longer_is_timed_again(monkeypatch):
    """The step times that `longtune probe --config` fits the planner's rates to: a shorter length that took as
    long per token as the longer one (a busy machine: 18.96 s at 512 tokens, 12.57 s at 2,048, measured) is timed
    again with the longer, and each keeps its faster time."""
    from types import SimpleNamespace

    from longtune.trainer import calibrate

    times = iter([18.96, 12.57, 2.54, 12.9])
    monkeypatch.setattr(calibrate, "_train", lambda cfg, n, machine, budget: (
        {"step_time_s": next(times)}, SimpleNamespace(predicted={"state_s": 0.0})))
    lines: list[str] = []
    seconds, _ = calibrate.step_compute_seconds(None, (512, 2048), "m.yaml", 1.0, log=lines.append)
    assert seconds == {512: 2.54, 2048: 12.57}
    assert calibrate.per_token_grows(seconds) and len(lines) == 5 and "timing both again" in lines[2]
    times = iter([2.54, 12.12])
    seconds, _ = calibrate.step_compute_seconds(None, (512, 2048), "m.yaml", 1.0, log=lines.append)
    assert seconds == {512: 2.54, 2048: 12.12} and len(lines) == 7  # grows: timed once
