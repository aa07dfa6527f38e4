"""LoRA adapters (trainer/adapters.py): exact under a memory plan, small checkpoints that resume bitwise, exports
that peft and transformers load with the trained logits, and the planner's count of their state."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_config, run_cli, tiny_model_config, write_yaml
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


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny random-init Llama written as a GGUF file (f32; tied embeddings, as SmolLM2's): the quick start's kind of
    base, which transformers reads de-quantized and still marks quantized, in a tenth of a second."""
    import gguf

    from longtune.trainer.config import ModelConfig
    from longtune.trainer.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(config={**tiny_model_config(), "tie_word_embeddings": True}))
    c = model.config
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_vocab_size(c.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name != "lm_head.weight":  # tied to the embedding
            writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_gguf, tokenizer_dir):
    """The tiny GGUF base with LoRA, 4 steps, checkpoints at 2 and 4."""
    run = tmp_path_factory.mktemp("lora") / "run"
    cfg = make_tiny_config(run, tokenizer_dir)
    cfg["model"] = {"path": str(tiny_gguf), "tokenizer": str(tokenizer_dir)}
    cfg["adapter"] = {"kind": "lora"}
    cfg["data"]["passkey"]["eval_samples"] = 0
    cfg["checkpoint"].update(every_n_steps=2, keep_last=5)
    out = run_cli("train", write_yaml(run.parent / "c.yaml", cfg))
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def losses(run):
    return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m}


def assert_holds_the_adapters_only(step, model_bytes: float):
    adapter = (step / "adapter.safetensors").stat().st_size
    assert not (step / "model.safetensors").exists()
    assert adapter < 0.05 * model_bytes  # a few percent of the fp32 model
    keys = set(load_file(str(step / "adapter.safetensors")))
    assert keys and all(".lora_" in k for k in keys)


def test_a_lora_checkpoint_holds_the_adapters_only_and_resumes_bitwise(lora_run, tiny_gguf, tmp_path):
    assert_holds_the_adapters_only(lora_run / "step_2", tiny_gguf.stat().st_size)
    copy = tmp_path / "copy"
    shutil.copytree(lora_run, copy)
    shutil.rmtree(copy / "step_4")
    out = run_cli("resume", copy / "step_2", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(copy) == losses(lora_run) and len(losses(lora_run)) == 4
    assert (copy / "step_4" / "adapter.safetensors").read_bytes() == (lora_run / "step_4" / "adapter.safetensors").read_bytes()


def test_a_lora_export_loads_in_peft_and_merged_in_transformers_with_the_trained_logits(lora_run, tmp_path):
    """Over a GGUF base (which the merge makes a plain model: transformers will not save one marked quantized)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from longtune.trainer.inputs import resolve_source
    from longtune.trainer.train import load_trained

    for args, folder in (([], "adapter"), (["--merge"], "merged")):
        out = run_cli("export", lora_run, "--out", tmp_path / folder, *args, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    cfg, trained, _, _ = load_trained(lora_run)
    ids = torch.randint(0, 1000, (1, 64))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        source = resolve_source(cfg.model.path, cfg.model.gguf_file)
        base = AutoModelForCausalLM.from_pretrained(source.folder, **source.kwargs())
        assert base.hf_quantizer is not None  # as the quick start's SmolLM2 loads
        adapter = PeftModel.from_pretrained(base, tmp_path / "adapter")(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
    assert torch.equal(adapter, expected)
    assert torch.allclose(merged, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_smollm2_with_lora_trains_and_checkpoints_the_adapters_alone(smollm2_dir, tmp_path):
    """The one run of the real SmolLM2-135M-Instruct with adapters (LoRA's default targets in all its 30 layers), as
    short as it goes: 1 step of a 96-token passkey sequence, its weights from the session's folder copy of the GGUF
    file (the tests above read a GGUF base)."""
    run = tmp_path / "run"
    out = run_cli("train", "configs/quickstart.yaml", f"model.path={smollm2_dir}", "adapter.kind=lora",
                  "data.seq_len=96", "train.max_steps=1", "data.passkey.eval_samples=0", f"run.output_dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "in lora adapters train" in out.stdout
    assert_holds_the_adapters_only(run / "step_1", 135e6 * 4)  # of the fp32 model's 540 MB
