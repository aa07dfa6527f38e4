"""On a GPU machine: training on CUDA in bf16, with GPU memory metrics. Skipped elsewhere."""

from __future__ import annotations

import math

import pytest
from conftest import read_metrics

from longtune.trainer.config import validate
from longtune.trainer.train import train

pytestmark = pytest.mark.gpu


def test_bf16_training_on_cuda_reports_gpu_memory(tmp_path, tiny_config):
    tiny_config["train"].update(max_steps=3, mixed_precision="bf16")
    tiny_config["data"]["seq_len"] = 2048
    tiny_config["checkpoint"]["every_n_steps"] = 3
    result = train(validate(tiny_config))
    steps = [m for m in read_metrics(result.output_dir) if "loss" in m]
    assert len(steps) == 3 and all(math.isfinite(m["loss"]) for m in steps)
    assert all(m["gpu_peak_allocated_gb"] > 0 and m["gpu_peak_reserved_gb"] >= m["gpu_peak_allocated_gb"] for m in steps)
    assert (result.output_dir / "step_3" / "COMPLETE").exists()
