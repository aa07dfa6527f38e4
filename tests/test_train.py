"""The training loop, in process, against plain transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_config, read_metrics, tiny_model_config, train_losses
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from longtune.trainer.config import validate
from longtune.trainer.data import DataLoader, PasskeyTask
from longtune.trainer.train import seed_everything, train


def _run(cfg: dict, name: str, tmp_path, **sections) -> tuple[dict[int, float], list[dict]]:
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    cfg["run"] = {"output_dir": str(tmp_path / name)}
    result = train(validate(cfg))
    assert result.step == cfg["train"]["max_steps"]
    return train_losses(result.output_dir), read_metrics(result.output_dir)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tokenizer_dir) -> tuple[dict[int, float], list[dict], Path]:
    """(losses, metrics, run folder) of the tiny config's run of 3 steps, trained once for the module: the reference
    the variants below (of as many steps) are compared with, and whose first step any run of the config takes."""
    tmp = tmp_path_factory.mktemp("plain")
    losses, metrics = _run(make_tiny_config(tmp / "unused", tokenizer_dir), "plain", tmp, train={"max_steps": 3})
    return losses, metrics, tmp / "plain"


def test_first_step_loss_equals_plain_transformers(plain_run, tiny_config, tokenizer_dir):
    losses = plain_run[0]

    seed_everything(tiny_config["train"]["seed"])
    fields = dict(tiny_config["model"]["config"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields), attn_implementation="sdpa")
    task = PasskeyTask(AutoTokenizer.from_pretrained(tokenizer_dir), 128, digits=4, seed=0)
    batch = next(DataLoader(task, 1, seed=0))
    plain = model(input_ids=batch.input_ids, labels=batch.labels).loss.detach()
    assert losses[1] == float(plain)


def test_metrics_have_the_expected_fields(tmp_path, tiny_config):
    _, metrics = _run(tiny_config, "run", tmp_path, train={"max_steps": 2}, log={"sinks": ["jsonl", "tensorboard"]})
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "tokens_seen", "host_peak_rss_gb", "tflops"):
        assert all(math.isfinite(m[key]) for m in steps), key
    assert steps[1]["tokens_seen"] == 2 * 128
    evals = [m for m in metrics if "passkey_acc" in m]
    assert [m["step"] for m in evals] == [0, 2], "eval before training and at the end"
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    resolved = (tmp_path / "run" / "config.resolved.yaml").read_text()
    assert "max_steps: 2" in resolved


def test_grad_accumulation_equals_one_big_batch(tmp_path, tiny_config):
    big, _ = _run(json.loads(json.dumps(tiny_config)), "big", tmp_path, train={"max_steps": 3, "micro_batch_size": 2, "grad_accum_steps": 1})
    acc, _ = _run(tiny_config, "acc", tmp_path, train={"max_steps": 3, "micro_batch_size": 1, "grad_accum_steps": 2})
    for step in (1, 2, 3):
        assert acc[step] == pytest.approx(big[step], rel=1e-6, abs=1e-6)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_config, plain_run):
    plain = plain_run[0]
    ckpt, _ = _run(tiny_config, "gc", tmp_path, train={"max_steps": 3}, memory={"gradient_checkpointing": True})
    for step in (1, 2, 3):
        assert ckpt[step] == pytest.approx(plain[step], rel=1e-6)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_other_architectures_train(tmp_path, tiny_config, model_type):
    tiny_config["model"]["config"] = tiny_model_config(model_type)
    _, metrics = _run(tiny_config, model_type, tmp_path, train={"max_steps": 2}, checkpoint={"every_n_steps": 1})
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    assert (tmp_path / model_type / "step_2" / "COMPLETE").exists()


def test_bf16_autocast_stays_close_to_fp32(tmp_path, tiny_config, plain_run):
    fp32 = plain_run[0]
    bf16, _ = _run(tiny_config, "bf16", tmp_path, train={"max_steps": 3, "mixed_precision": "bf16"})
    for step in (1, 2, 3):
        assert bf16[step] == pytest.approx(fp32[step], rel=2e-2)
        assert bf16[step] != fp32[step], "autocast must actually run in bf16"


def test_lr_follows_warmup_then_cosine(tmp_path, tiny_config):
    _, metrics = _run(tiny_config, "run", tmp_path, train={"max_steps": 6, "warmup_steps": 2, "lr": 1e-3, "min_lr_ratio": 0.1})
    lrs = [m["lr"] for m in metrics if "lr" in m]
    expected = [0.0, 5e-4] + [1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4))) for s in range(2, 6)]
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_packed_documents_are_learned(tmp_path, tiny_config):
    """A few short documents from a jsonl file, packed: the model memorises them."""
    data = tmp_path / "docs.jsonl"
    docs = ["the quick brown fox jumps over the lazy dog", "long context needs memory planning", "pack me tight"]
    data.write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    losses, _ = _run(
        tiny_config, "run", tmp_path,
        data={"kind": "jsonl", "path": str(data), "text_field": "content", "seq_len": 32},
        train={"max_steps": 25, "lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
    )
    assert losses[25] < 0.5 * losses[1]


def test_nonfinite_loss_stops_the_run_with_a_clear_error(tmp_path, tiny_config):
    with pytest.raises(FloatingPointError, match="lower train.lr"):
        _run(tiny_config, "run", tmp_path, train={"max_steps": 3, "lr": 1e30, "clip_grad_norm": None, "warmup_steps": 0})


def test_weights_are_saved_as_trained(plain_run):
    """The final checkpoint holds the weights the loop ended with (load -> same eval loss)."""
    from longtune.trainer.train import load_trained

    _, metrics, run = plain_run
    final_eval = [m for m in metrics if "passkey_loss" in m][-1]
    assert final_eval["step"] == 3
    cfg, model, tokenizer, _ = load_trained(run)
    from longtune.trainer.data import passkey_accuracy

    task = PasskeyTask(tokenizer, cfg.data.seq_len, cfg.data.passkey.digits, cfg.train.seed, split="eval")
    again = passkey_accuracy(model, task, cfg.data.passkey.eval_samples, torch.device("cpu"))
    assert again["passkey_loss"] == final_eval["passkey_loss"]


def test_kernels_on_gives_the_losses_of_kernels_off(tmp_path, tiny_config):
    """model.kernels switches each fused kernel; the training run's losses stay those of plain transformers."""
    tiny_config["data"]["passkey"]["eval_samples"] = 0  # the interpreter is slow; the steps are what matter
    # ... and its time goes with the tokens (a RoPE and an RMSNorm program per token): a sequence just long enough
    # for the passkey prompt (89 tokens with 3 digits).
    tiny_config["data"].update(seq_len=96, passkey={"digits": 3, "eval_samples": 0})
    plain, _ = _run(json.loads(json.dumps(tiny_config)), "plain", tmp_path, train={"max_steps": 2})
    kernels = {"rmsnorm": True, "rope": True, "swiglu": True, "fused_ce": True, "ce_chunk_tokens": 32}
    tiny_config["model"]["kernels"] = kernels
    fused, _ = _run(tiny_config, "fused", tmp_path, train={"max_steps": 2})
    for step in (1, 2):
        assert fused[step] == pytest.approx(plain[step], rel=1e-5)
