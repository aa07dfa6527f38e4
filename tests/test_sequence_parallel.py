"""Sequence parallelism (Ulysses, parallel.sequence_parallel): exact, planned per rank, refused clearly.

Exactness (tests/sp_worker.py under torchrun, gloo): tiny Llama, Qwen2, Mistral and Qwen3, one document per
row and packed documents (one crossing every shard boundary), through plain autograd and through the
activation runtime with a plan that offloads to the host and recomputes. The loss equals the unsharded
transformers run's to 1e-6 relative (fp32: the shards' sums are added in another order), and every parameter
gradient to 1e-6 of its norm (max abs difference), as the runtime's own tests allow. 2 processes: SP 2;
4 processes: SP 2 x DP 2, and SP 4 with 2 key/value heads (repeated to one per rank).
The trainer end to end (DDP, FSDP2, ZeRO-3, with a plan, resume, export) is in tests/test_parallel.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli_env, run_cli, write_yaml

LOSS_RTOL, GRAD_RTOL = 1e-6, 1e-6


def _run_worker(tmp_path: Path, nproc: int, cases: list[str]) -> dict:
    out = tmp_path / "sp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / "tests" / "sp_worker.py"), str(out), *cases]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cli_env())
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def _assert_exact(results: dict, cases: list[str]) -> None:
    assert sorted(results) == sorted(cases)
    for case, r in results.items():
        assert r["loss"] == pytest.approx(r["reference_loss"], rel=LOSS_RTOL), case
        assert r["grad_rel"] <= GRAD_RTOL, (case, r["worst"], r["grad_rel"])
        if ":runtime:" in case:  # the plan ran for real: bytes came back from the host, chunks were recomputed
            assert r["moved_bytes"] > 0 and r["recompute_s"] > 0, (case, r)


def test_sequence_parallel_2_equals_the_unsharded_model(tmp_path):
    cases = [f"{family}:{packing}:hf:2" for family in ("llama", "qwen2", "mistral") for packing in ("plain", "packed")]
    cases += [f"{family}:packed:runtime:2" for family in ("llama", "qwen2", "mistral", "qwen3")] + ["llama:plain:runtime:2"]
    _assert_exact(_run_worker(tmp_path, 2, cases), cases)


def test_sequence_parallel_times_data_parallel_on_4_processes(tmp_path):
    cases = ["llama:packed:hf:2", "qwen2:packed:runtime:2", "llama:packed:hf:4", "mistral:packed:runtime:4"]
    _assert_exact(_run_worker(tmp_path, 4, cases), cases)


# --- refused before anything loads ---------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    (["parallel.sequence_parallel=3"], "num_attention_heads=4 is not divisible by parallel.sequence_parallel=3"),
    (["parallel.sequence_parallel=2", "data.seq_len=127"], "data.seq_len=127 must be a multiple of it"),
    (["parallel.sequence_parallel=2", "data.passkey.eval_samples=2"], "set data.passkey.eval_samples=0"),
])
def test_a_split_the_model_or_data_cannot_take_is_refused_in_one_line(override, message, tmp_path, tiny_config):
    tiny_config["data"]["passkey"]["eval_samples"] = 0
    result = run_cli("plan", write_yaml(tmp_path / "c.yaml", tiny_config), *override)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_world_the_split_does_not_divide_is_refused():
    from longtune.trainer.config import ConfigError
    from longtune.trainer.ranks import Ranks
    from longtune.trainer.sequence_parallel import SequenceParallel

    class Cfg:
        class parallel:
            sequence_parallel = 2

    with pytest.raises(ConfigError, match="does not divide the 3 processes launched"):
        SequenceParallel.build(Cfg, Ranks(0, 3))
    result = run_cli("plan", "quickstart", "parallel.sequence_parallel=2", "data.passkey.eval_samples=0", "--nproc", "3")
    assert result.returncode == 2 and "--nproc 3 is not a multiple of parallel.sequence_parallel=2" in result.stderr


def test_the_shard_of_a_batch_predicts_across_the_boundary():
    """A shard's last token's target is the next shard's first token: the shift is made on the whole sequence."""
    import torch

    from longtune.trainer.data import IGNORE_INDEX, Batch

    ids = torch.arange(8)[None]
    labels = ids.clone()
    labels[0, 0] = IGNORE_INDEX
    whole = Batch(ids, labels, torch.arange(8)[None])
    first, second = whole.shard(0, 2), whole.shard(1, 2)
    assert first.input_ids.tolist() == [[0, 1, 2, 3]] and first.shift_labels.tolist() == [[1, 2, 3, 4]]
    assert second.shift_labels.tolist() == [[5, 6, 7, IGNORE_INDEX]]
    assert first.loss_tokens + second.loss_tokens == whole.loss_tokens == 7
