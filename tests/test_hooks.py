"""offload/hooks.py: every module and gradient hook of a run installed by one HookSet, in ROLES order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longtune.offload.hooks import HookSet


def test_callbacks_run_in_role_order_whatever_order_they_were_added_in():
    layer, calls = nn.Linear(3, 3), []
    hooks = HookSet()
    hooks.before_forward(layer, "streamer", lambda: calls.append("streamer: fetch"))
    hooks.before_forward(layer, "optimizer", lambda: calls.append("optimizer: gate"))
    hooks.after_forward(layer, "streamer", lambda out: calls.append(f"streamer: free {tuple(out.shape)}"))
    hooks.on_grad(layer.weight, "streamer", lambda p: calls.append("streamer: grad"))
    hooks.on_grad(layer.weight, "galore", lambda p: calls.append("galore: grad"))
    hooks.on_grad(layer.weight, "optimizer", lambda p: calls.append(f"optimizer: grad {p.grad is not None}"))
    hooks.install()
    assert (len(layer._forward_pre_hooks), len(layer._forward_hooks)) == (1, 1)  # one torch hook per module
    layer(torch.ones(2, 3)).sum().backward()
    assert calls == ["optimizer: gate", "streamer: fetch", "streamer: free (2, 3)",
                     "optimizer: grad True", "galore: grad", "streamer: grad"]
    with pytest.raises(RuntimeError, match="add callbacks before install"):
        hooks.on_grad(layer.bias, "optimizer", lambda p: None)
    hooks.remove()
    calls.clear()
    layer(torch.ones(2, 3)).sum().backward()
    assert calls == [] and not layer._forward_pre_hooks
    with pytest.raises(ValueError, match="hook role 'kernels'"):
        hooks.on_grad(layer.bias, "kernels", lambda p: None)


def test_the_runtime_installs_one_hook_per_module_for_the_optimizer_and_the_streamer(tmp_path):
    """Optimizer state on the host and weights streamed: both add callbacks to the runtime's HookSet, so each
    decoder layer carries one forward pre-hook and one forward hook, and each weight one gradient hook."""
    from conftest import tiny_model_config
    from transformers import AutoConfig, AutoModelForCausalLM

    from longtune.offload.runtime import MemoryRuntime, RuntimeOptions
    from longtune.planner.plan import make_plan
    from longtune.planner.problem import Machine, ModelShape, build_problem

    fields = tiny_model_config()
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    shape = ModelShape.from_hf_config(model.config.to_dict(), "float32")
    problem = build_problem(shape, 32, Machine.load("h100-pcie5"), 80e9, chunks=1, optimizer="cpu", params="cpu",
                            offload_activations=False)
    runtime = MemoryRuntime(model, make_plan(problem), RuntimeOptions(torch.device("cpu")))
    try:
        layer = model.model.layers[0]
        assert (len(layer._forward_pre_hooks), len(layer._forward_hooks)) == (1, 1)
        assert all(len(p._post_accumulate_grad_hooks or {}) == 1 for p in layer.parameters())
    finally:
        runtime.close()
    assert not layer._forward_pre_hooks and not layer.self_attn.q_proj.weight._post_accumulate_grad_hooks
