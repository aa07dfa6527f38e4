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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_galore_fused_update_kernel_on_cuda(dtype):
    import torch

    from longtune.kernels.galore_update import galore_update, galore_update_reference

    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for side, (rows, cols), rank in (("right", (4096, 1024), 128), ("left", (1024, 4096), 128)):
        low = (rows, rank) if side == "right" else (rank, cols)
        basis = torch.randn(*((rank, cols) if side == "right" else (rows, rank)), device="cuda", generator=gen).to(dt)
        m = torch.randn(*low, device="cuda", generator=gen).to(dt)
        v = (torch.rand(*low, device="cuda", generator=gen) + 0.01).to(dt)
        w = torch.randn(rows, cols, device="cuda", generator=gen).to(dt)
        expected = w.float().clone()
        galore_update_reference(expected, m.float(), v.float(), basis.float(), side, 1e-3, 0.25, 1e-6, 1e-4)
        galore_update(w, m, v, basis, side, 1e-3, 0.25, 1e-6, 1e-4)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1.6e-2, atol=1e-2)
        torch.testing.assert_close(w.float(), expected, **tol)


def test_galore_training_on_cuda_uses_the_fused_kernel(tiny_config):
    tiny_config["train"].update(max_steps=3, mixed_precision="bf16")
    tiny_config["optim"] = {"name": "galore_adamw", "galore": {"rank": 8, "update_proj_gap": 2}}
    result = train(validate(tiny_config))
    steps = [m for m in read_metrics(result.output_dir) if "loss" in m]
    assert len(steps) == 3 and all(math.isfinite(m["loss"]) for m in steps)


def test_galore_moments_on_the_host_match_moments_on_the_device():
    import torch

    from longtune.offload.galore import GaloreAdamW, GaloreOptions

    def run(state_device):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
        opt = GaloreAdamW(model.named_parameters(), GaloreOptions(rank=16, targets=("*.weight",), update_proj_gap=3),
                          lr=1e-3, state_device=state_device)
        gen = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(6):
            x = torch.randn(64, 256, device="cuda", generator=gen)
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, opt

    on_device, _ = run(None)
    on_host, opt = run(torch.device("cpu"))
    assert opt.bytes_to_host > 0 and all(v.device.type == "cpu" for s in opt.state.values() for k, v in s.items()
                                         if k.startswith("exp_avg"))
    for a, b in zip(on_host.parameters(), on_device.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_more_ranks_than_gpus_are_refused_before_any_rank_starts(tmp_path, tiny_config):
    import torch
    from conftest import run_cli, write_yaml

    n = torch.cuda.device_count()
    result = run_cli("train", write_yaml(tmp_path / "c.yaml", tiny_config), "--nproc", str(n + 1))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--nproc {n + 1}: {n + 1} processes on this machine take a GPU each" in result.stderr
    assert "[rank" not in result.stdout + result.stderr  # refused by the launcher, not by a dying rank
