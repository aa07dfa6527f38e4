"""The activation runtime on a CUDA GPU, in bf16: copy streams, pinned pools, the CUDA flash kernels.

Skipped without a GPU (conftest). What the CPU tests cannot show: the same plans on real device memory, where
`torch.cuda.max_memory_allocated` is the measurement the plan's rows predict.
"""

from __future__ import annotations

import pytest
import torch
from test_activation_runtime import G, grads_of, tiny, uniform

from longtune.offload.runtime import MemoryRuntime, RuntimeOptions
from longtune.planner.plan import plan_of
from longtune.planner.problem import Machine, ModelShape, Tier, build_problem

pytestmark = pytest.mark.gpu


def _model(cfg: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    c = dict(cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c), attn_implementation="sdpa",
                                             dtype=torch.bfloat16).cuda().train()
    model.config.use_cache = False
    return model


def _plan(cfg: dict, tokens: int, layers: list[dict]):
    machine = Machine("test", 80e9, 989e12, 0.6, 0.5, (Tier("host", 1e12, 50e9, 50e9), Tier("nvme", 1e12, 10e9, 10e9)))
    problem = build_problem(ModelShape.from_hf_config(cfg, "bfloat16"), tokens, machine, 80e9, chunks=G)
    return plan_of(problem, layers)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_plans_on_the_gpu_match_plain(family, tmp_path):
    cfg = {**tiny(family, layers=4), "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8,
           "num_key_value_heads": 2, "head_dim": 32}
    model = _model(cfg)
    ids = torch.randint(0, 256, (1, 1024), device="cuda")
    ref = grads_of(model, ids)
    plan = _plan(cfg, 1024, uniform(4, input={"host": G}, pre={"recompute": 2, "nvme": 2}, attn={"host": G},
                                    post={"recompute": 3, "gpu": 1}))
    runtime = MemoryRuntime(model, plan, RuntimeOptions(torch.device("cuda"), activations=True,
                                                        nvme_path=str(tmp_path / "nvme")))
    try:
        with runtime.step(1):
            got = grads_of(model, ids)
        torch.cuda.synchronize()
    finally:
        runtime.close()
    assert abs(got[0].item() - ref[0].item()) <= 1e-2 * abs(ref[0].item())
    for name, g in ref[1].items():
        assert (got[1][name].float() - g.float()).abs().max() <= 2 ** -6 * g.float().norm(), name
    r = runtime.dispatcher.residency
    assert r.device_peak == pytest.approx(plan.predicted["activation_peak_bytes"], rel=0.05)


def test_streams_overlap_a_prefetch_with_compute(tmp_path):
    """With the activations of every layer on the host, compute waits for copies only at the first layer."""
    cfg = {**tiny("llama", layers=8), "hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
           "num_key_value_heads": 2}
    model = _model(cfg)
    ids = torch.randint(0, 256, (1, 4096), device="cuda")
    plan = _plan(cfg, 4096, uniform(8, input={"host": G}, attn={"host": G}, pre={"recompute": G}, post={"recompute": G}))
    runtime = MemoryRuntime(model, plan, RuntimeOptions(torch.device("cuda"), activations=True))
    try:
        for _ in range(2):
            with runtime.step(1):
                grads_of(model, ids)
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        runtime.h2d.stall_s()
        runtime.h2d.wait_s = 0.0
        start.record()
        with runtime.step(1):
            grads_of(model, ids)
        end.record()
        torch.cuda.synchronize()
        step_s = start.elapsed_time(end) / 1e3
        assert runtime.h2d.stall_s() < 0.2 * step_s
    finally:
        runtime.close()
