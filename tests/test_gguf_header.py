"""A GGUF model's config from its header (trainer/gguf_header.py): equal to transformers' reading, and fast."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, SMOLLM2_GGUF, cli_env

from longtune.trainer.config import ModelConfig
from longtune.trainer.gguf_header import gguf_model_config, read_header
from longtune.trainer.inputs import resolve_source, written_model_config
from longtune.trainer.model import build_config


def test_header_config_equals_transformers_reading_of_smollm2():
    cfg = ModelConfig(path=SMOLLM2_GGUF)
    mine, theirs = written_model_config(cfg), build_config(cfg).to_dict()
    assert {k: theirs.get(k) for k in mine} == mine
    assert mine["tie_word_embeddings"] is True and mine["num_hidden_layers"] == 30


def test_a_broken_or_foreign_file_is_left_to_transformers(tmp_path):
    source = resolve_source(SMOLLM2_GGUF)
    data = (source.folder / source.gguf_file).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:1000])  # the header ends mid-way
    assert gguf_model_config(tmp_path / "cut.gguf") is None
    (tmp_path / "not.gguf").write_bytes(b"GGML" + data[4:1000])
    assert gguf_model_config(tmp_path / "not.gguf") is None
    fields, names = read_header(source.folder / source.gguf_file)
    assert fields["general.architecture"] == "llama" and len(names) == 272


def test_plan_of_a_gguf_model_imports_no_torch():
    code = ("import sys; from longtune.launch.cli import main; "
            "rc = main(['plan', 'quickstart', 'memory.budget_gb=3', '--out', sys.argv[1]]); "
            "print('torch' in sys.modules, 'transformers' in sys.modules, rc)")
    out = subprocess.run([sys.executable, "-c", code, "/dev/null"], capture_output=True, text=True, cwd=REPO,
                         env=cli_env(), timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False False 0", out.stderr[-2000:]
