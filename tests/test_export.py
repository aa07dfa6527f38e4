"""Export: the real SmolLM2 fine-tuned for a step reloads in transformers with the same logits.

Its weights come from the session's folder copy of the GGUF file (conftest.smollm2_dir: the GGUF parse, paid once
per session, was most of this test's time): the checkpoint's config.json, which the export builds the model from,
is the GGUF's, quantization_config included, as in a run from the GGUF file. Runs from a GGUF base:
tests/test_adapters.py; the GGUF header: tests/test_gguf_header.py."""

from __future__ import annotations

import torch
from conftest import run_cli, write_yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from longtune.trainer.train import load_trained


def test_smollm2_export_reloads_with_identical_logits(tmp_path, smollm2_dir, ram_dir):
    # One step (warmup 0) is a fine-tuned model to export; the run folder (a 1.5 GB checkpoint) and the export
    # (540 MB) in RAM where there is room (conftest.ram_dir).
    run_dir, out = ram_dir / "run", ram_dir / "exported"
    cfg = {
        "model": {"path": str(smollm2_dir)},
        "data": {"kind": "passkey", "seq_len": 128, "passkey": {"eval_samples": 0}},
        "train": {"max_steps": 1, "lr": 1e-4, "warmup_steps": 0},
        "run": {"output_dir": str(run_dir)},
        "log": {"sinks": ["jsonl"]},
    }
    result = run_cli("train", write_yaml(tmp_path / "c.yaml", cfg))
    assert result.returncode == 0, result.stderr
    result = run_cli("export", run_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "step_1" in result.stdout

    _, trained, tokenizer, _ = load_trained(run_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    text = "The pass key is 71432. Remember it."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, reloaded_tokenizer(text, return_tensors="pt")["input_ids"])
    trained.eval()
    with torch.no_grad():
        assert torch.equal(trained(input_ids=ids).logits, reloaded(input_ids=ids).logits)
