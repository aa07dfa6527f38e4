"""LoRA adapters (trainer/adapters.py): exact under a memory plan, small checkpoints that resume bitwise, exports
that peft and transformers load with the trained logits, and the planner's count of their state."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import SMOLLM2_GGUF, run_cli
from safetensors.torch import load_file
from test_activation_runtime import G, assert_same, build, grads_of, plan_of, problem, run_plan, tiny, uniform

from longtune.planner.problem import AdapterSizing, ModelShape
from longtune.trainer.adapters import apply_adapter
from longtune.trainer.config import AdapterConfig

LORA = AdapterConfig(kind="lora", rank=4, alpha=8.0)


def lora_model(family: str):
    model = build(tiny(family))
    apply_adapter(model, LORA)
    torch.manual_seed(5)
    with torch.no_grad():  # B starts at zero (the update is zero); random adapters make every gradient count
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lora_under_a_plan_that_offloads_and_recomputes_is_exact(family, tmp_path):
    """The runtime's layer split calls each projection as a module, so peft's LoRA layers run inside it: the loss
    and every adapter gradient equal the same peft-injected model run plainly, and only the adapters train."""
    model = lora_model(family)
    ids = torch.randint(0, 256, (1, 48))
    ref = grads_of(model, ids)
    assert ref[1] and all(".lora_" in name for name in ref[1])
    plan = plan_of(problem(tiny(family)), uniform(2, input={"host": G}, pre={"recompute": 2, "gpu": 2}, attn={"nvme": G},
                                                  post={"recompute": 1, "host": 3}))
    got, runtime = run_plan(model, plan, ids, tmp_path)
    assert_same(ref, got)
    assert runtime.dispatcher.stash.unplanned_bytes == 0


@pytest.mark.parametrize("family, dtype", [("llama", torch.float32), ("qwen3", torch.bfloat16)])
def test_the_planner_counts_the_adapters_to_the_byte(family, dtype):
    """AdapterSizing's parameters are the injected model's trainable ones, byte for byte, and AdamW's state for them
    (two moments in the weights' dtype) is what a step makes."""
    cfg = tiny(family)
    model = build(cfg, dtype)
    apply_adapter(model, LORA)
    trainable = [p for p in model.parameters() if p.requires_grad]
    shape = ModelShape.from_hf_config(cfg, str(dtype).removeprefix("torch."))
    sizing = AdapterSizing(LORA.rank, tuple(LORA.target_modules))
    wb = shape.layer.dtype_bytes
    assert sizing.params(shape) * wb == sum(p.numel() * p.element_size() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    model(input_ids=torch.randint(0, 256, (1, 16)), labels=torch.randint(0, 256, (1, 16))).loss.backward()
    opt.step()
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert moments == 2 * wb * sizing.params(shape)


def test_adapter_settings_are_checked():
    from longtune.trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="adapter.kind is none"):
        load_config("quickstart", ["adapter.rank=8"])
    with pytest.raises(ConfigError, match="optim.name=galore_adamw"):
        load_config("quickstart", ["adapter.kind=lora", "optim.name=galore_adamw"])
    model = build(tiny("llama"))
    with pytest.raises(ConfigError, match="q_projj not in the model; its linear layers are .*q_proj"):
        apply_adapter(model, AdapterConfig(kind="lora", target_modules=["q_projj"]))


QUICK = ["adapter.kind=lora", "data.seq_len=256", "train.max_steps=4", "checkpoint.every_n_steps=2",
         "checkpoint.keep_last=5", "data.passkey.eval_samples=0"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """The quick-start model (SmolLM2-135M-Instruct) with LoRA, 4 steps, checkpoints at 2 and 4."""
    run = tmp_path_factory.mktemp("lora") / "run"
    out = run_cli("train", "configs/quickstart.yaml", *QUICK, f"run.output_dir={run}", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def losses(run):
    return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m}


def test_a_lora_checkpoint_holds_the_adapters_only_and_resumes_bitwise(lora_run, tmp_path):
    step = lora_run / "step_2"
    adapter = (step / "adapter.safetensors").stat().st_size
    assert not (step / "model.safetensors").exists()
    assert adapter < 0.05 * 135e6 * 4  # a few percent of the fp32 model's 540 MB
    keys = set(load_file(str(step / "adapter.safetensors")))
    assert keys and all(".lora_" in k for k in keys)
    copy = tmp_path / "copy"
    shutil.copytree(lora_run, copy)
    shutil.rmtree(copy / "step_4")
    out = run_cli("resume", copy / "step_2", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(copy) == losses(lora_run)
    assert (copy / "step_4" / "adapter.safetensors").read_bytes() == (lora_run / "step_4" / "adapter.safetensors").read_bytes()


def test_a_lora_export_loads_in_peft_and_merged_in_transformers_with_the_trained_logits(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from longtune.trainer.inputs import resolve_source
    from longtune.trainer.train import load_trained

    for args, folder in (([], "adapter"), (["--merge"], "merged")):
        out = run_cli("export", lora_run, "--out", tmp_path / folder, *args, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    _, trained, _, _ = load_trained(lora_run)
    ids = torch.randint(0, 1000, (1, 64))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        source = resolve_source(SMOLLM2_GGUF, None)
        base = AutoModelForCausalLM.from_pretrained(source.folder, **source.kwargs())
        adapter = PeftModel.from_pretrained(base, tmp_path / "adapter")(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
    assert torch.equal(adapter, expected)
    assert torch.allclose(merged, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
