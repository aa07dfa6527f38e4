"""QLoRA adapters (adapter.kind=qlora, trainer/adapters.py): LoRA over a base whose decoder-layer linears are 4-bit NF4
(bitsandbytes). Exact under a memory plan against the same quantized model run plainly, counted by the planner to the
byte, small checkpoints that resume bitwise, exports that peft (over a re-quantized base) and transformers load with
the trained logits, one-line refusals, no network on import; and one short run of the real SmolLM2."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from conftest import cli_env, make_tiny_config, train_losses
from safetensors.torch import load_file
from test_activation_runtime import G, assert_same, build, grads_of, plan_of, problem, run_plan, tiny, uniform
from test_adapters import assert_holds_the_adapters_only, tiny_gguf  # noqa: F401  (a fixture)

from longtune.planner.problem import AdapterSizing, ModelShape
from longtune.trainer.adapters import apply_adapter, quantize_base
from longtune.trainer.config import AdapterConfig, ConfigError, load_config, validate


def qlora(**kw) -> AdapterConfig:
    return AdapterConfig(kind="qlora", rank=4, alpha=8.0, **kw)


def qlora_model(family: str, dtype=torch.float32, **kw):
    model = build(tiny(family), dtype)
    apply_adapter(model, qlora(**kw))
    torch.manual_seed(5)
    with torch.no_grad():  # B starts at zero (the update is zero); random adapters make every gradient count
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("family, compute, saved", [("llama", "auto", ()), ("qwen3", "float32", ()),
                                                    ("qwen3", "bfloat16", ()),
                                                    ("llama", "auto", ("lm_head", "input_layernorm"))],
                         ids=["llama-auto", "qwen3-float32", "qwen3-bfloat16", "llama-auto+saved"])
def test_qlora_under_a_plan_that_offloads_and_recomputes_is_exact(family, compute, saved, tmp_path):
    """The layer split calls each projection as a module, so peft's bnb LoRA layers over bitsandbytes' Linear4bit run
    inside it: the loss and every adapter gradient equal the same quantized peft model run plainly, to fp32 rounding
    (matmuls in bf16 inside the fp32 model: to bf16 rounding, the chunks' matmuls summing in another order), and only
    the adapters train (and the trained copies of modules_to_save, which stay unquantized)."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = qlora_model(family, compute_dtype=compute, modules_to_save=list(saved))
    projections = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, LoraLinear4bit)]
    assert len(projections) == 2 * 7 and all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in projections)
    assert all(m.get_base_layer().compute_dtype == (torch.bfloat16 if compute == "bfloat16" else torch.float32)
               for m in projections)
    ids = torch.randint(0, 256, (1, 48))
    ref = grads_of(model, ids)
    lora = [name for name in ref[1] if ".lora_" in name]
    assert len(lora) == 2 * 7 * 2 and len(ref[1]) - len(lora) == (3 if saved else 0)  # the head, 2 layers' norm
    plan = plan_of(problem(tiny(family)), uniform(2, input={"host": G}, pre={"recompute": 2, "gpu": 2}, attn={"nvme": G},
                                                  post={"recompute": 1, "host": 3}))
    got, runtime = run_plan(model, plan, ids, tmp_path)
    assert_same(ref, got, rel=1e-3 if compute == "bfloat16" else 1e-6)
    assert runtime.dispatcher.stash.unplanned_bytes == 0


@pytest.mark.parametrize("family, dtype, double_quant", [("llama", torch.float32, True), ("qwen3", torch.bfloat16, False)])
def test_the_planner_counts_the_4bit_base_to_the_byte(family, dtype, double_quant):
    """AdapterSizing.base_bytes is what the quantized model holds, byte for byte: the packed NF4 weights and every
    tensor of their quantization state (absmax scales, 8-bit with double quant, code books), the rest (embeddings,
    head, norms) in the weights' dtype; the adapters as LoRA's; and the plan's GPU weights are the two."""
    cfg = tiny(family)
    model = build(cfg, dtype)
    apply_adapter(model, qlora(double_quant=double_quant))
    storages = {}
    for p in model.parameters():
        if p.requires_grad:
            continue
        qs = getattr(p, "quant_state", None)
        tensors = [p] if qs is None else [p.data, qs.absmax, qs.code, *((qs.offset, qs.state2.absmax, qs.state2.code)
                                                                        if qs.nested else ())]
        assert qs is None or qs.nested == double_quant
        storages.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors})
    shape = ModelShape.from_hf_config(cfg, str(dtype).removeprefix("torch."))
    sizing = AdapterSizing(4, quantized=True, double_quant=double_quant)
    assert sizing.base_bytes(shape) == sum(storages.values())
    wb = shape.layer.dtype_bytes
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert sizing.params(shape) * wb == trainable
    state = problem(cfg, dtype=str(dtype).removeprefix("torch."), adapter=sizing, optimizer="gpu").state_options[0]
    assert state.gpu_bytes["weights"] == sum(storages.values()) + trainable
    # Llama-3-8B's projections: half a byte a weight, plus an absmax per 64 (1 byte with double quant, else 4)
    big = ModelShape.from_hf_config(load_config("llama3-8b-128k").model.config, "bfloat16")
    weights = big.num_layers * sum(m * n for m, n in big.layer_matrices())
    per_weight = (sizing.base_bytes(big) - (big.params - weights) * 2) / weights
    assert 0.5 + (1 if double_quant else 4) / 64 < per_weight < 0.5 + (1 if double_quant else 4) / 64 + 1e-3


def test_qlora_refusals_are_one_line(monkeypatch):
    def refused(match, call):
        with pytest.raises(ConfigError, match=match) as e:
            call()
        assert "\n" not in str(e.value)

    refused("adapter.double_quant is a QLoRA setting", lambda: load_config("quickstart", ["adapter.kind=lora",
                                                                                        "adapter.double_quant=false"]))
    refused("not fsdp2: .* use parallel.strategy=ddp",
            lambda: load_config("quickstart", ["adapter.kind=qlora", "parallel.strategy=fsdp2"]))
    refused("optim.name=galore_adamw", lambda: load_config("quickstart", ["adapter.kind=qlora", "optim.name=galore_adamw"]))
    # a layer that is no nn.Linear (GPT-2's Conv1D) has nothing to quantize
    from transformers.pytorch_utils import Conv1D

    model = build(tiny("llama"))
    for layer in model.model.layers:
        for name, m in list(layer.named_modules()):
            if isinstance(m, torch.nn.Linear):
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent), child, Conv1D(m.out_features, m.in_features))
    refused("k_proj names model.layers.0.self_attn.k_proj, which is or holds a projection adapter.kind=qlora keeps in 4 "
            "bits, frozen: use adapter.kind=lora to train it in full",
            lambda: apply_adapter(build(tiny("llama")), qlora(target_modules=["q_proj"], modules_to_save=["k_proj"])))
    refused("q_proj, .* not in the model; its linear layers are lm_head", lambda: apply_adapter(model, qlora()))
    refused(r"decoder layer 0 \(LlamaDecoderLayer\) has none \(its layers: Conv1D, LlamaRMSNorm.*\); use adapter.kind=lora",
            lambda: quantize_base(model, qlora(target_modules=["lm_head"])))
    # bitsandbytes not installed: the config says so before anything loads; one that does not import, at the model
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    refused("bitsandbytes, which is not installed: pip install bitsandbytes", lambda: load_config("quickstart", ["adapter.kind=qlora"]))
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    refused("bitsandbytes, which does not import here .*: pip install bitsandbytes", lambda: apply_adapter(build(tiny("llama")), qlora()))


def test_bitsandbytes_imports_without_the_network_or_a_warning():
    """bitsandbytes' CPU backend asks the Hugging Face Hub for a kernel as it is imported (peft imports it, and
    transformers imports peft): under longtune it asks nothing and says nothing."""
    code = ("import socket\n"
            "asked = []\n"
            "socket.getaddrinfo = lambda *a, **k: asked.append(a[:2]) or (_ for _ in ()).throw(OSError('offline'))\n"
            "import longtune.trainer\n"
            "import bitsandbytes, bitsandbytes.backends.cpu.ops\n"
            "print('asked', asked)\n")
    out = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "asked []" in out.stdout
    assert "kernels-community" not in out.stderr and "Failed to load" not in out.stderr, out.stderr


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_gguf, tokenizer_dir):  # noqa: F811
    """The tiny GGUF base with QLoRA, 4 steps in this process, checkpoints at 2 and 4, passkey evaluations before
    and after (eval mode without gradients: bitsandbytes would repack its weights for inference there)."""
    from longtune.trainer.train import train

    run = tmp_path_factory.mktemp("qlora") / "run"
    cfg = make_tiny_config(run, tokenizer_dir)
    cfg["model"] = {"path": str(tiny_gguf), "tokenizer": str(tokenizer_dir)}
    cfg["adapter"] = {"kind": "qlora"}
    cfg["data"]["passkey"]["eval_samples"] = 1
    cfg["checkpoint"].update(every_n_steps=2, keep_last=5)
    train(validate(cfg))
    return run, cfg


def test_a_qlora_checkpoint_holds_the_adapters_only_and_resumes_bitwise(qlora_run, tiny_gguf, tmp_path):  # noqa: F811
    from longtune.trainer.train import train

    run, cfg = qlora_run
    assert_holds_the_adapters_only(run / "step_2", tiny_gguf.stat().st_size)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "step_4")
    train(validate({**cfg, "run": {"output_dir": str(copy), "resume": "auto"}}))
    assert train_losses(copy) == train_losses(run) and len(train_losses(run)) == 4
    assert (copy / "step_4" / "adapter.safetensors").read_bytes() == (run / "step_4" / "adapter.safetensors").read_bytes()


def test_a_qlora_export_loads_in_peft_over_a_requantized_base_and_merged_in_transformers(qlora_run, tmp_path):
    """The adapter folder over the base quantized again (quantize_base) gives the trained logits exactly; --merge
    writes the NF4 base de-quantized to model.dtype plus the update, a plain transformers model: the same logits to
    fp32 rounding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from longtune.trainer.model import build_model
    from longtune.trainer.train import export, load_trained

    run, _ = qlora_run
    export(run, tmp_path / "adapter")
    export(run, tmp_path / "merged", merge=True)
    cfg, trained, _, _ = load_trained(run)
    trained.eval()
    ids = torch.randint(0, 1000, (1, 64))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        base = build_model(cfg.model)
        quantize_base(base, cfg.adapter)
        adapter = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(input_ids=ids).logits
        merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        merged = merged_model(input_ids=ids).logits
    assert torch.equal(adapter, expected)
    assert torch.allclose(merged, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    assert not any(p.dtype == torch.uint8 for p in merged_model.parameters())


def test_smollm2_with_qlora_trains_and_checkpoints_the_adapters_alone(smollm2_dir, tmp_path, capfd):
    """The one run of the real SmolLM2-135M-Instruct with QLoRA (its 210 projections in NF4), short: 2 steps of a
    96-token passkey sequence without warm-up (so both update the adapters), in this process (the CLI's start-up is
    LoRA's test's); nothing from bitsandbytes on the console. Most of its time is bitsandbytes quantizing the 106M
    projection weights on the CPU."""
    from longtune.trainer.train import train

    run = tmp_path / "run"
    train(load_config("quickstart", [f"model.path={smollm2_dir}", "adapter.kind=qlora", "data.seq_len=96",
                                     "train.max_steps=2", "train.warmup_steps=0", "data.passkey.eval_samples=0",
                                     f"run.output_dir={run}"]))
    out, err = capfd.readouterr()
    assert "model 139.4M params (4.88M in qlora adapters train)" in out
    assert "bitsandbytes" not in (out + err).lower() and "kernels-community" not in err, err[-3000:]
    assert len(train_losses(run)) == 2
    assert_holds_the_adapters_only(run / "step_2", 135e6 * 4)  # of the fp32 model's 540 MB
    trained = load_file(str(run / "step_2" / "adapter.safetensors"))
    assert all(t.abs().max() > 0 for k, t in trained.items() if "lora_B" in k)  # B starts at zero: both steps updated
