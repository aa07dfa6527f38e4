"""LoRA adapters (trainer/adapters.py), with modules trained in full beside them (adapter.modules_to_save): exact
under a memory plan, small checkpoints that resume bitwise, exports that peft and transformers load with the trained
logits, and the planner's count of their state."""

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
# modules_to_save: the LM head, the embeddings, the decoder layers' first norm and the final norm in full; and every
# norm (Qwen3's q/k norms too) and the MLPs, whose projections then are no LoRA targets
SAVED = AdapterConfig(kind="lora", rank=4, alpha=8.0, modules_to_save=["lm_head", "embed_tokens", "input_layernorm",
                                                                       "model.norm"])
NORMS_MLP = AdapterConfig(kind="lora", rank=4, alpha=8.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          modules_to_save=["norm", "mlp"])


def lora_model(family: str, adapter: AdapterConfig = LORA):
    model = build(tiny(family))
    apply_adapter(model, adapter)
    torch.manual_seed(5)
    with torch.no_grad():  # B starts at zero (the update is zero); random adapters make every gradient count
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.05)
    return model


def trains(name: str) -> bool:
    return ".lora_" in name or ".modules_to_save." in name


@pytest.mark.parametrize("family, adapter", [("llama", LORA), ("qwen3", LORA), ("llama", SAVED), ("qwen3", NORMS_MLP)],
                         ids=["llama", "qwen3", "llama+saved", "qwen3+norms,mlp"])
def test_lora_under_a_plan_that_offloads_and_recomputes_is_exact(family, adapter, tmp_path):
    """The runtime's layer split calls each projection and norm as a module, so peft's LoRA layers and its trained
    copies of modules_to_save (ModulesToSaveWrapper) run inside it: the loss and every trainable gradient equal the
    same peft-injected model run plainly, and only the adapters and the saved modules' copies train."""
    model = lora_model(family, adapter)
    ids = torch.randint(0, 256, (1, 48))
    ref = grads_of(model, ids)
    assert ref[1].keys() == {n for n, p in model.named_parameters() if p.requires_grad} and all(map(trains, ref[1]))
    saved = {n for n in ref[1] if ".modules_to_save." in n}
    assert bool(saved) == bool(adapter.modules_to_save)
    if adapter is SAVED:  # the head's gradient comes back (the fused loss reads the trained copy)
        assert {"lm_head.modules_to_save.default.weight", "model.embed_tokens.modules_to_save.default.weight",
                "model.norm.modules_to_save.default.weight"} < saved
    plan = plan_of(problem(tiny(family)), uniform(2, input={"host": G}, pre={"recompute": 2, "gpu": 2}, attn={"nvme": G},
                                                  post={"recompute": 1, "host": 3}))
    got, runtime = run_plan(model, plan, ids, tmp_path)
    assert_same(ref, got)
    assert runtime.dispatcher.stash.unplanned_bytes == 0


@pytest.mark.parametrize("family, dtype, adapter, tied", [
    ("llama", torch.float32, LORA, False), ("qwen3", torch.bfloat16, LORA, False),
    ("llama", torch.float32, SAVED, False), ("llama", torch.bfloat16, SAVED, True),
    ("qwen3", torch.float32, NORMS_MLP, False)], ids=["llama", "qwen3", "llama+saved", "llama+saved,tied", "qwen3+norms,mlp"])
def test_the_planner_counts_the_adapters_to_the_byte(family, dtype, adapter, tied):
    """AdapterSizing's parameters are the injected model's trainable ones, byte for byte (the saved modules' copies
    too, a tied head's once; the most in one decoder layer, and whether the head's weight trains), the state's GPU
    weights are all of the model's (the frozen originals of the saved modules stay), and AdamW's state for what
    trains (two moments in the weights' dtype) is what a step makes."""
    cfg = {**tiny(family), "tie_word_embeddings": tied}
    model = build(cfg, dtype)
    apply_adapter(model, adapter)
    trainable = [p for p in model.parameters() if p.requires_grad]
    shape = ModelShape.from_hf_config(cfg, str(dtype).removeprefix("torch."))
    sizing = AdapterSizing(adapter.rank, tuple(adapter.target_modules), saved=tuple(adapter.modules_to_save))
    wb = shape.layer.dtype_bytes
    assert sizing.params(shape) * wb == sum(p.numel() * p.element_size() for p in trainable)
    per_layer = [sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(f"model.layers.{i}."))
                 for i in range(shape.num_layers)]
    assert sizing.layer_params(shape) == max(per_layer)
    assert sizing.saved_params(shape)[3] == model.lm_head.weight.requires_grad == (adapter is SAVED)
    state = problem(cfg, dtype=str(dtype).removeprefix("torch."), adapter=sizing).state(None).gpu_bytes
    assert state["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert state["grads"] == sizing.params(shape) * wb
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
    with pytest.raises(ConfigError, match="adapter.kind is none"):
        load_config("quickstart", ["adapter.modules_to_save=[lm_head]"])
    for saved, match in (
            (["lm_heed"], "lm_heed matches no module of the model with weights; the modules that can train in full: "
                          "down_proj, embed_tokens, gate_proj, input_layernorm, k_proj, lm_head, norm, o_proj, "
                          "post_attention_layernorm, up_proj$"),  # not q_proj, v_proj: the LoRA targets
            (["rotary_emb"], "rotary_emb matches no module of the model with weights"),
            (["v_proj"], "v_proj names model.layers.0.self_attn.v_proj, which is or holds a LoRA target"),
            (["self_attn"], "self_attn names model.layers.0.self_attn, which is or holds a LoRA target"),
            (["mlp", "down_proj"], "down_proj names model.layers.0.mlp.down_proj and mlp names model.layers.0.mlp, "
                                   "one inside the other")):
        with pytest.raises(ConfigError, match=match) as e:
            apply_adapter(build(tiny("llama")), AdapterConfig(kind="lora", modules_to_save=saved,
                                                              target_modules=["q_proj", "v_proj"]))
        assert "\n" not in str(e.value)


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


RUN_SAVED = ("lm_head", "input_layernorm")
RUN_SAVED_KEYS = {"model.embed_tokens.modules_to_save.default.weight", "model.layers.0.input_layernorm.modules_to_save.default.weight",
                  "model.layers.1.input_layernorm.modules_to_save.default.weight"}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_gguf, tokenizer_dir):
    """The tiny GGUF base with LoRA and, trained in full beside the adapters, its LM head (tied to the embeddings: one
    trained copy) and its layers' first norms; 4 steps, checkpoints at 2 and 4. (QLoRA's run, tests/test_qlora.py,
    has adapters alone.)"""
    run = tmp_path_factory.mktemp("lora") / "run"
    cfg = make_tiny_config(run, tokenizer_dir)
    cfg["model"] = {"path": str(tiny_gguf), "tokenizer": str(tokenizer_dir)}
    cfg["adapter"] = {"kind": "lora", "modules_to_save": list(RUN_SAVED)}
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


def test_a_lora_checkpoint_holds_the_adapters_and_saved_modules_and_resumes_bitwise(lora_run, tiny_gguf, tmp_path):
    """adapter.safetensors holds the adapters and the saved modules' trained copies (not the frozen originals, not the
    rest of the base), optimizer.pt their AdamW state; resumed from step 2, step 4 is bitwise the straight run's."""
    import gguf

    step = lora_run / "step_2"
    assert not (step / "model.safetensors").exists()
    state = load_file(str(step / "adapter.safetensors"))
    assert {k for k in state if ".lora_" not in k} == RUN_SAVED_KEYS
    assert sum(t.numel() * t.element_size() for t in state.values()) <= (step / "adapter.safetensors").stat().st_size
    moments = torch.load(step / "optimizer.pt", weights_only=True)["state"]
    assert sorted(t.numel() for s in moments.values() for k, t in s.items() if k == "exp_avg") == \
        sorted(t.numel() for t in state.values())
    base = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(str(tiny_gguf)).tensors}
    trained_embeddings = state["model.embed_tokens.modules_to_save.default.weight"]
    assert trained_embeddings.shape == base["token_embd.weight"].shape
    assert not torch.equal(trained_embeddings, base["token_embd.weight"])  # trained, from the base's values
    assert (trained_embeddings - base["token_embd.weight"]).abs().max() < 0.1
    copy = tmp_path / "copy"
    shutil.copytree(lora_run, copy)
    shutil.rmtree(copy / "step_4")
    out = run_cli("resume", copy / "step_2", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(copy) == losses(lora_run) and len(losses(lora_run)) == 4
    assert (copy / "step_4" / "adapter.safetensors").read_bytes() == (lora_run / "step_4" / "adapter.safetensors").read_bytes()


def test_a_lora_export_loads_in_peft_and_merged_in_transformers_with_the_trained_logits(lora_run, tmp_path):
    """Over a GGUF base (which the merge makes a plain model: transformers will not save one marked quantized). The
    saved modules are in the peft folder under peft's names (the tied head beside the embeddings, as
    PeftModel.save_pretrained writes it), and the merged model holds their trained copies."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from longtune.trainer.inputs import resolve_source
    from longtune.trainer.train import load_trained

    for args, folder in (([], "adapter"), (["--merge"], "merged")):
        out = run_cli("export", lora_run, "--out", tmp_path / folder, *args, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    cfg, trained, _, path = load_trained(lora_run)
    assert torch.equal(trained.get_input_embeddings().weight,  # the trained copy, as the checkpoint holds it
                       load_file(str(path / "adapter.safetensors"))["model.embed_tokens.modules_to_save.default.weight"])
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
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == list(RUN_SAVED) and config["ensure_weight_tying"]
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    saved = {k for k in weights if ".lora_" not in k}
    assert saved == {"base_model.model." + k.replace(".modules_to_save.default", "") for k in RUN_SAVED_KEYS} | \
        {"base_model.model.lm_head.weight"}
    assert torch.equal(weights["base_model.model.lm_head.weight"], weights["base_model.model.model.embed_tokens.weight"])


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
