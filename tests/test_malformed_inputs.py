"""Malformed inputs through the real CLI, against a real run folder: each exits 2 (a bad input the user gave) or 1
(a fault found at run time) with one `error:` line on stderr and no traceback, and the run folder is byte for byte
as it was: nothing written, nothing removed, no lock or temporary file left.

The run folder is trained once for the module (a tiny Llama, 2 steps, a checkpoint at each). A case that needs a
damaged checkpoint damages a copy and checks the copy. Most cases run `main([...])` in process; the last few run
the `longtune` process itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from conftest import run_cli, write_yaml

from longtune.launch.cli import main

# --- the run folder and its snapshot ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tokenizer_dir) -> Path:
    from conftest import tiny_model_config

    root = tmp_path_factory.mktemp("malformed")
    run = root / "run"
    cfg = {
        "model": {"config": tiny_model_config(), "tokenizer": str(tokenizer_dir)},
        "data": {"kind": "passkey", "seq_len": 128, "passkey": {"digits": 4, "eval_samples": 0}},
        "train": {"max_steps": 2, "lr": 1e-3, "seed": 0},
        "checkpoint": {"every_n_steps": 1, "keep_last": 2},
        "run": {"output_dir": str(run)},
        "log": {"sinks": ["jsonl"]},
    }
    assert main(["train", str(write_yaml(root / "c.yaml", cfg))]) == 0
    assert (run / "step_1" / "COMPLETE").exists() and (run / "step_2" / "COMPLETE").exists()
    return run


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under the folder, hidden ones too: (kind, size, mtime, content hash of small files)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        if p.is_dir():
            out[str(p.relative_to(folder))] = ("dir",)
        else:
            digest = hashlib.sha1(p.read_bytes()).hexdigest() if st.st_size < 1 << 20 else None
            out[str(p.relative_to(folder))] = ("file", st.st_size, st.st_mtime_ns, digest)
    return out


@dataclass
class Ctx:
    run: Path  # the shared, trained run folder (read-only for the cases)
    tmp: Path  # this case's scratch folder, outside the run folder
    watched: Path = None  # the run folder whose snapshot must not change

    def damaged_run(self, damage: Callable[[Path], None]) -> Path:
        """A copy of the trained run, damaged; it becomes the folder watched."""
        copy = self.tmp / "damaged"
        shutil.copytree(self.run, copy)
        text = (copy / "config.resolved.yaml").read_text().replace(str(self.run), str(copy))
        (copy / "config.resolved.yaml").write_text(text)
        damage(copy)
        self.watched = copy
        return copy

    def config(self, **sections) -> dict:
        """The run's own config with sections replaced, pointed at the run (a `train` of it must resume)."""
        cfg = yaml.safe_load((self.run / "config.resolved.yaml").read_text())
        cfg["run"]["resume"] = "auto"
        for name, value in sections.items():
            cfg[name] = {**cfg.get(name, {}), **value} if isinstance(value, dict) else value
        return cfg

    def new_run_config_file(self, **sections) -> Path:
        """A config for a new run in a folder of its own (watched: it must stay empty), sections replaced."""
        self.watched = self.tmp / "new-run"
        return self.config_file(run={"output_dir": str(self.watched), "resume": None}, **sections)

    def config_file(self, text: str | None = None, name: str = "c.yaml", **sections) -> Path:
        path = self.tmp / name
        if text is None:
            return write_yaml(path, self.config(**sections))
        path.write_text(text)
        return path

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def valid_yaml(self) -> str:
        return yaml.safe_dump(self.config(), sort_keys=False)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def newest(run: Path) -> Path:
    return run / "step_2"


# --- the cases: each returns (argv, exit code, a piece of the message) ---------------------------------

def resume_with(*overrides):
    return lambda c: (["resume", c.run, *overrides], 2)


def data_file(name: str, content, kind: str, *extra):
    return lambda c: (["resume", c.run, f"data.kind={kind}", f"data.path={c.file(name, content)}", *extra], 2)


def train_file(text_of: Callable[["Ctx"], str]):
    return lambda c: (["train", c.config_file(text_of(c))], 2)


def with_sections(**sections):
    return lambda c: (["train", c.config_file(**sections)], 2)


def resume_damaged(damage: Callable[[Path], None], code: int = 1):
    return lambda c: (["resume", c.damaged_run(damage)], code)


def export_damaged(damage: Callable[[Path], None], code: int = 1):
    return lambda c: (["export", c.damaged_run(damage), "--out", c.tmp / "out"], code)


def plan_with(*extra, machine=None):
    def case(c):
        argv = ["plan", c.config_file(), "--out", c.tmp / "plan.yaml", *extra]
        if machine is not None:
            argv += ["--machine", c.file("machine.yaml", machine)]
        return argv, 2
    return case


def bundled_profile(old: str, new: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "planner" / "machines" / "h100-pcie5.yaml").read_text()
    assert old in text
    return text.replace(old, new)


def plan_file(text_of: Callable[["Ctx"], str]):
    return lambda c: (["resume", c.run, f"memory.plan={c.file('plan.yaml', text_of(c))}", "memory.budget_gb=1"], 2)


def bad_step_folder_as_run(c):
    return ["resume", c.damaged_run(lambda r: (r / "step_2" / "COMPLETE").unlink()) / "step_2"], 2


JSONL_OK = '{"text": "hello"}\n'


def _parquet(c: Ctx, **columns) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = c.tmp / "d.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def _model_folder(c: Ctx, config_json: str) -> Path:
    folder = c.tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text(config_json)
    return folder


def _model_copy(c: Ctx, damage: Callable[[Path], None]) -> Path:
    """The run's newest weights and config.json as a transformers model folder, its weights damaged."""
    folder = c.tmp / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(newest(c.run) / name, folder / name)
    damage(folder / "model.safetensors")
    return folder


def _garbage_tokenizer(c: Ctx) -> Path:
    """A copy of the run's tokenizer folder whose tokenizer.json is not JSON."""
    folder = c.tmp / "tok"
    shutil.copytree(c.run / "tokenizer", folder)
    (folder / "tokenizer.json").write_text("{ not json")
    return folder


def _other_weights(run: Path) -> Path:
    """model.safetensors of a model with another hidden size (the file is whole; the shapes are wrong)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(newest(run) / "model.safetensors"))
    out = run.parent / "other.safetensors"
    save_file({k: torch.zeros(*(d * 2 for d in v.shape)) for k, v in state.items()}, str(out))
    return out

CASES = {
    # overrides given to `resume`: typed, ranged, cross-checked against the model (exit 2)
    "bool-as-int": resume_with("train.max_steps=true"),
    "negative-steps": resume_with("train.max_steps=-1"),
    "word-as-float": resume_with("train.lr=fast"),
    "list-as-int": resume_with("train.max_steps=[1,2]"),
    "int-as-bool": resume_with("data.packing=1"),
    "typo-key": resume_with("train.lerning_rate=1e-4"),
    "other-tools-key": resume_with("learning_rate=1e-4"),
    "unknown-section": resume_with("trian.max_steps=3"),
    "section-as-value": resume_with("train=3"),
    "no-equals": resume_with("train.max_steps"),
    "beta-of-one": resume_with("optim.betas=[0.9,1.0]"),
    "one-beta": resume_with("optim.betas=[0.9]"),
    "negative-seed": resume_with("train.seed=-1"),
    "seed-over-32-bits": resume_with("train.seed=4294967296"),
    "zero-seq-len": resume_with("data.seq_len=0"),
    "seq-len-past-positions": resume_with("data.seq_len=8192"),
    "positions-override-below-seq-len": resume_with("model.max_position_embeddings=32"),
    "rope-scaling-not-a-mapping": resume_with("model.rope_scaling=linear"),
    "unknown-data-kind": resume_with("data.kind=csv"),
    "unknown-optimizer": resume_with("optim.name=sgd"),
    "unknown-log-sink": resume_with("log.sinks=[wandb]"),
    "negative-budget": resume_with("memory.budget_gb=-1"),
    "prefetch-too-deep": resume_with("memory.prefetch_depth=9"),
    "zero-plan-chunks": resume_with("memory.plan_chunks=0"),
    "recompute-twice": resume_with("memory.gradient_checkpointing=true", "memory.budget_gb=1"),
    "heads-do-not-divide-hidden": resume_with("model.config.num_attention_heads=5"),
    "kv-heads-do-not-divide-heads": resume_with("model.config.num_key_value_heads=3"),
    "zero-hidden-size": resume_with("model.config.hidden_size=0"),
    "keep-last-zero": resume_with("checkpoint.keep_last=0"),
    "min-lr-ratio-above-one": resume_with("train.min_lr_ratio=2"),
    "unknown-dtype": resume_with("model.dtype=float8"),
    "resume-of-missing-step": resume_with("run.resume=/nonexistent/step_3"),
    "galore-options-with-adamw": resume_with("optim.galore.rank=8"),
    "galore-layerwise-with-clipping": resume_with("optim.name=galore_adamw", "optim.galore.layerwise=true"),
    "galore-targets-match-nothing": lambda c: (["train", c.new_run_config_file(optim={"name": "galore_adamw", "galore": {"targets": ["nothing.*"]}})], 2),
    "galore-zero-rank": resume_with("optim.name=galore_adamw", "optim.galore.rank=0"),
    "galore-unknown-projector": resume_with("optim.name=galore_adamw", "optim.galore.projector=qr"),
    "galore-with-nvme-optimizer": resume_with("optim.name=galore_adamw", "memory.optimizer=nvme"),
    "optimizer-switched-on-resume": resume_with("optim.name=galore_adamw"),
    # config files given to `train` (pointed at the run folder, resuming it; exit 2)
    "duplicate-key": train_file(lambda c: c.valid_yaml().replace("train:\n", "train:\n  max_steps: 3\n", 1)),
    "duplicate-section": train_file(lambda c: c.valid_yaml() + "train:\n  max_steps: 500\n"),
    "yaml-syntax": train_file(lambda c: c.valid_yaml() + "data: [unclosed\n"),
    "top-level-list": train_file(lambda c: "- model\n- data\n"),
    "empty-file": train_file(lambda c: ""),
    "python-object-tag": train_file(lambda c: "model: !!python/object/apply:os.system ['echo pwned']\n"),
    "binary-file": lambda c: (["train", c.file("c.yaml", b"\x00\x01\xff\xfe" * 64)], 2),
    "config-not-found": lambda c: (["train", c.tmp / "nope.yaml"], 2),
    "folder-as-config": lambda c: (["train", c.tmp], 2),
    "unknown-top-level-key-in-file": with_sections(trainer={"max_steps": 3}),
    "path-and-config-both": with_sections(model={"path": "/nonexistent"}),
    "inline-config-without-type": lambda c: (["train", c.config_file(model={"config": {"hidden_size": 32}})], 2),
    "unsupported-model-type": lambda c: (["train", c.config_file(model={"config": {**c.config()["model"]["config"], "model_type": "bogus"}})], 2),
    "model-path-missing": lambda c: (["train", c.config_file(model={"config": None, "path": str(c.tmp / "nope")})], 2),
    "tokenizer-missing": with_sections(model={"tokenizer": "/nonexistent/tokenizer"}),
    # data files (exit 2)
    "data-path-missing": resume_with("data.kind=jsonl", "data.path=/nonexistent/data.jsonl"),
    "jsonl-bad-json": data_file("d.jsonl", JSONL_OK + "{not json\n", "jsonl"),
    "jsonl-number-text": data_file("d.jsonl", JSONL_OK + '{"text": 42}\n', "jsonl"),
    "jsonl-list-text": data_file("d.jsonl", JSONL_OK + '{"text": ["a", "b"]}\n', "jsonl"),
    "jsonl-missing-field": data_file("d.jsonl", JSONL_OK + '{"body": "x"}\n', "jsonl"),
    "jsonl-not-an-object": data_file("d.jsonl", JSONL_OK + '[1, 2]\n', "jsonl"),
    "jsonl-empty": data_file("d.jsonl", "", "jsonl"),
    "text-not-utf8": data_file("d.txt", b"caf\xe9 \xff\xfe latin-1\n", "text"),
    "jsonl-not-utf8": data_file("d.jsonl", b'{"text": "caf\xe9"}\n', "jsonl"),
    "parquet-garbage": data_file("d.parquet", b"PAR1 this is not parquet", "parquet"),
    "parquet-without-the-column": lambda c: (["resume", c.run, "data.kind=parquet", f"data.path={_parquet(c, body=['x'])}"], 2),
    "hf-disk-not-a-dataset": lambda c: (["resume", c.run, "data.kind=hf_disk", f"data.path={c.file('ds/state.json', '{}').parent}"], 2),
    "model-folder-config-not-json": lambda c: (["train", c.config_file(model={"config": None, "path": str(_model_folder(c, "{not json"))})], 2),
    "model-folder-heads-do-not-divide": lambda c: (["train", c.config_file(model={"config": None, "path": str(_model_folder(c, json.dumps({**c.config()["model"]["config"], "num_attention_heads": 3})))})], 2),
    "model-folder-weights-truncated": lambda c: (["train", c.new_run_config_file(model={"config": None, "path": str(_model_copy(c, truncate))})], 2),
    "tokenizer-folder-garbage": lambda c: (["train", c.new_run_config_file(model={"tokenizer": str(_garbage_tokenizer(c))})], 2),
    "vocab-smaller-than-tokenizer": lambda c: (["train", c.new_run_config_file(model={"config": {**c.config()["model"]["config"], "vocab_size": 1000}})], 2),
    "odd-head-dim": lambda c: (["train", c.new_run_config_file(model={"config": {**c.config()["model"]["config"], "hidden_size": 36}})], 2),
    "data-folder-without-files": lambda c: (["resume", c.run, "data.kind=jsonl", f"data.path={c.file('d/readme.md', 'x').parent}"], 2),
    # checkpoint folders (damaged: a fault found at run time, exit 1)
    "truncated-weights-on-resume": resume_damaged(lambda r: truncate(newest(r) / "model.safetensors")),
    "truncated-weights-on-export": export_damaged(lambda r: truncate(newest(r) / "model.safetensors")),
    "state-of-wrong-shape": resume_damaged(lambda r: (newest(r) / "trainer_state.json").write_text("[1, 2, 3]")),
    "state-not-json": resume_damaged(lambda r: (newest(r) / "trainer_state.json").write_text("{step: ")),
    "state-with-bad-step": resume_damaged(lambda r: (newest(r) / "trainer_state.json").write_text('{"step": "two"}')),
    "state-without-data": resume_damaged(lambda r: (newest(r) / "trainer_state.json").write_text(
        '{"step": 2, "tokens_seen": 512}')),
    "optimizer-missing": resume_damaged(lambda r: next(newest(r).glob("optimizer*")).unlink()),
    "optimizer-truncated": resume_damaged(lambda r: truncate(next(newest(r).glob("optimizer*")))),
    "weights-missing-on-export": export_damaged(lambda r: (newest(r) / "model.safetensors").unlink()),
    "checkpoint-config-json-garbage": resume_damaged(lambda r: (newest(r) / "config.json").write_text("{heads: ")),
    "scheduler-state-garbage": resume_damaged(lambda r: (newest(r) / "scheduler.pt").write_bytes(b"\x80\x04junk")),
    "rng-state-missing": resume_damaged(lambda r: (newest(r) / "rng.pt").unlink()),
    "run-tokenizer-truncated": resume_damaged(lambda r: truncate(r / "tokenizer" / "tokenizer.json", 0.3)),
    "weights-of-another-shape": resume_damaged(lambda r: shutil.copy(_other_weights(r), newest(r) / "model.safetensors")),
    "run-config-broken": resume_damaged(lambda r: (r / "config.resolved.yaml").write_text("model: [\n"), code=2),
    # paths given to resume and export (exit 2)
    "resume-missing-folder": lambda c: (["resume", c.tmp / "nope"], 2),
    "resume-a-file": lambda c: (["resume", c.file("f.txt", "x")], 2),
    "resume-not-a-run": lambda c: (["resume", c.tmp], 2),
    "resume-incomplete-step-folder": bad_step_folder_as_run,
    "export-out-is-a-file": lambda c: (["export", c.run, "--out", c.file("out", "x")], 2),
    "export-out-not-empty": lambda c: (["export", c.run, "--out", c.file("out/keep.txt", "x").parent], 2),
    "export-into-a-checkpoint": lambda c: (["export", c.run, "--out", c.run / "step_2", "--force"], 2),
    "export-into-the-run-folder": lambda c: (["export", c.run, "--out", c.run, "--force"], 2),
    "export-missing-step": lambda c: (["export", c.run, "--out", c.tmp / "out", "--step", "7"], 1),
    "export-step-folder-and-other-step": lambda c: (["export", c.run / "step_2", "--out", c.tmp / "out", "--step", "1"], 2),
    "export-missing-run": lambda c: (["export", c.tmp / "nope", "--out", c.tmp / "out"], 2),
    "export-merge-without-adapters": lambda c: (["export", c.run, "--out", c.tmp / "out", "--merge"], 2),
    # plans and machine profiles (exit 2)
    "plan-file-missing": lambda c: (["resume", c.run, f"memory.plan={c.tmp / 'nope.yaml'}", "memory.budget_gb=1"], 2),
    "plan-file-garbage": plan_file(lambda c: "layers: [\n"),
    "plan-file-a-list": plan_file(lambda c: "- 1\n- 2\n"),
    "plan-file-wrong-version": plan_file(lambda c: "version: 999\n"),
    "machine-profile-missing": lambda c: (["plan", c.config_file(), "--out", c.tmp / "p.yaml", "--machine", c.tmp / "nope.yaml"], 2),
    "machine-profile-garbage": plan_with(machine="tiers: [\n"),
    "machine-profile-a-list": plan_with(machine="- gpu\n"),
    "machine-profile-empty": plan_with(machine=""),
    "machine-profile-zero-bandwidth": plan_with(machine=bundled_profile("to_gpu_gbps: 50", "to_gpu_gbps: 0")),
    "machine-profile-word-for-number": plan_with(machine=bundled_profile("memory_gb: 79.6", "memory_gb: lots")),
    "machine-profile-without-gpu": plan_with(machine=bundled_profile("gpu:", "gpx:")),
    "memory-machine-missing": resume_with("memory.machine=/nonexistent/machine.yaml", "memory.budget_gb=1"),
    "plan-out-is-a-folder": lambda c: (["plan", c.config_file(), "--out", c.tmp], 2),
    # the command line itself (exit 2)
    "no-subcommand": lambda c: ([], 2),
    "unknown-subcommand": lambda c: (["bogus"], 2),
    "unknown-option": lambda c: (["resume", c.run, "--bogus"], 2),
    "export-without-out": lambda c: (["export", c.run], 2),
    "step-not-a-number": lambda c: (["export", c.run, "--out", c.tmp / "o", "--step", "two"], 2),
    "probe-too-small": lambda c: (["probe", "--size-mb", "1", "--out", c.tmp / "m.yaml"], 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input(name, trained_run, tmp_path, capsys):
    ctx = Ctx(run=trained_run, tmp=tmp_path)
    before_shared = snapshot(trained_run)
    argv, code = CASES[name](ctx)
    watched = ctx.watched or trained_run
    before = snapshot(watched)
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert rc == code, f"exit {rc}, stderr {err!r}, stdout tail {out[-1500:]!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "internal error" not in lines[0], lines[0]
    assert snapshot(watched) == before, f"the run folder changed: {lines[0]}"
    assert snapshot(trained_run) == before_shared


def test_there_are_at_least_sixty():
    assert len(CASES) >= 60


# --- the real process: the same contract as a user sees it -------------------------------------------

@pytest.mark.parametrize("argv_of", [
    lambda c: ["resume", c.run, "train.max_steps=true"],
    lambda c: ["train", c.config_file(c.valid_yaml() + "train:\n  max_steps: 500\n")],
    lambda c: ["export", c.damaged_run(lambda r: truncate(newest(r) / "model.safetensors")), "--out", c.tmp / "out"],
], ids=["override", "duplicate-section", "truncated-weights"])
def test_malformed_input_in_a_real_process(argv_of, trained_run, tmp_path):
    ctx = Ctx(run=trained_run, tmp=tmp_path)
    argv = argv_of(ctx)
    watched = ctx.watched or trained_run
    before = snapshot(watched)
    proc = run_cli(*argv, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (1, 2), proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert snapshot(watched) == before


# --- the same paths, given right ---------------------------------------------------------------------

def test_resume_of_a_checkpoint_folder_continues_the_run_from_that_step(trained_run, tmp_path, capsys):
    run = Ctx(run=trained_run, tmp=tmp_path).damaged_run(lambda r: None)  # an undamaged copy
    assert main(["resume", str(run / "step_1"), "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert f"{run / 'step_1'} is a checkpoint of the run in {run}: resuming that run from step 1" in out
    assert f"resumed from {run / 'step_1'} at step 1" in out
    # The run went on in its own folder (not inside step_1), steps 2-3 retrained from step 1
    assert sorted(p.name for p in run.glob("step_*")) == ["step_2", "step_3"]
    assert yaml.safe_load((run / "config.resolved.yaml").read_text())["train"]["max_steps"] == 3


def test_resume_of_a_finished_run_says_there_is_nothing_to_train(trained_run, tmp_path, capsys):
    run = Ctx(run=trained_run, tmp=tmp_path).damaged_run(lambda r: None)
    assert main(["resume", str(run)]) == 0
    assert f"nothing to train: the run is at step 2 and train.max_steps=2 (to go on: longtune resume {run} " \
           "train.max_steps=N)" in capsys.readouterr().out


def test_export_of_a_checkpoint_folder_and_into_a_non_empty_folder_with_force(trained_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(trained_run / "step_1"), "--out", str(out), "--force"]) == 0
    assert f"exported {trained_run / 'step_1'} -> {out}" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "mine"  # --force writes beside what is there
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
