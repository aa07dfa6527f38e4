"""The CLI's error contract: bad input gets one `error: ` line naming the key or path, exit 2, no traceback.

Runtime failures (export of a run without a complete checkpoint) exit 1, also as one line.
Most cases call `main([...])` in process (every one fails in config validation or in
`train.check`, before a model loads); a few run the real `longtune` process to prove the
exit status and stderr as a user sees them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import run_cli, write_yaml

from longtune.launch.cli import main
from longtune.trainer.checkpoint import COMPLETE


def cli_error(capsys, *argv, code: int = 2) -> str:
    """`longtune ARGV` in process: assert exit `code` and one `error: ` line; return the message after it."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert rc == code, f"exit {rc}, stderr: {err!r}, stdout: {out[-2000:]!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


def assert_one_error_line(proc, code: int = 2) -> str:
    """The same checks on a real `longtune` process."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}, stderr: {proc.stderr!r}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0].removeprefix("error: ")


@pytest.fixture
def cfg_path(tmp_path, tiny_config) -> Path:
    """A valid config file; a test breaks one thing with an override."""
    return write_yaml(tmp_path / "c.yaml", tiny_config)


def run_folder(path: Path, cfg: dict, steps: dict[int, bool] | None = None) -> Path:
    """A run folder as `train` leaves it: config.resolved.yaml and step_N folders (complete or not)."""
    path.mkdir(parents=True)
    write_yaml(path / "config.resolved.yaml", cfg)
    for step, complete in (steps or {}).items():
        (path / f"step_{step}").mkdir()
        write_yaml(path / f"step_{step}" / "config.resolved.yaml", cfg)
        if complete:
            (path / f"step_{step}" / COMPLETE).write_text("")
    return path


# --- config keys, types and values, given as overrides ------------------------------------------

@pytest.mark.parametrize("overrides, expected", [
    pytest.param(["trian.max_steps=3"], ["unknown key trian", "at the top level", "did you mean train?"], id="top-level-typo"),
    pytest.param(["train.lrr=1e-4"], ["unknown key train.lrr", "in section train", "did you mean train.lr?"], id="nested-typo"),
    pytest.param(["data.passkey.digitz=3"], ["unknown key data.passkey.digitz", "in section data.passkey",
                                             "did you mean data.passkey.digits?"], id="deep-typo"),
    pytest.param(["train.zzz=1"], ["unknown key train.zzz", "in section train; valid keys: ", "max_steps, ", "schedule"], id="no-close-match"),
    pytest.param(["train.max_steps=lots"], ["train.max_steps", "got 'lots'", "expected a valid integer"], id="not-an-int"),
    pytest.param(["train.max_steps=1.5"], ["train.max_steps", "got 1.5", "fractional part"], id="fractional-int"),
    pytest.param(["data.seq_len=0"], ["data.seq_len", "got 0", "expected a number > 0"], id="seq-len-zero"),
    pytest.param(["data.seq_len=-5"], ["data.seq_len", "got -5", "expected a number > 0"], id="seq-len-negative"),
    pytest.param(["train.min_lr_ratio=2"], ["train.min_lr_ratio", "got 2", "expected a number <= 1"], id="above-max"),
    pytest.param(["train.schedule=cosin"], ["train.schedule", "got 'cosin'",
                                            "expected one of 'cosine', 'linear' or 'constant'"], id="bad-enum"),
    pytest.param(["log.sinks=[console,jsonll]"], ["log.sinks.1", "got 'jsonll'",
                                                  "'console', 'jsonl' or 'tensorboard'"], id="bad-list-item"),
    pytest.param(["log.sinks=console"], ["log.sinks", "got 'console'", "expected a valid list"], id="list-expected"),
    pytest.param(["data.packing=maybe"], ["data.packing", "got 'maybe'", "expected true or false"], id="not-a-bool"),
    pytest.param(["train.max_steps=0", "train.lr=-1"], ["train.max_steps: got 0; expected a number > 0",
                                                        "train.lr: got -1; expected a number > 0"], id="two-errors-one-line"),
    pytest.param(["train.max_steps.x=1"], ["override 'train.max_steps.x=1'", "train.max_steps is not a section"], id="value-as-section"),
    pytest.param(["train..lr=1"], ["override key 'train..lr' has an empty part"], id="empty-key-part"),
    pytest.param(["=3"], ["override '=3'", "key.sub=value"], id="empty-key"),
    pytest.param(["data.kind=jsonl"], ["data.kind=jsonl needs data.path"], id="file-data-without-path"),
    pytest.param(["memory.budget_gb=-3"], ["memory.budget_gb", "must be > 0 (GB), auto, or null"], id="negative-budget"),
    pytest.param(["memory.budget_gb=lots"], ["memory.budget_gb", "got 'lots'"], id="budget-not-a-number"),
    pytest.param(["memory.budget_gb=2", "memory.gradient_checkpointing=true"],
                 ["memory.gradient_checkpointing and a memory plan", "drop gradient_checkpointing"], id="plan-and-checkpointing"),
    pytest.param(["memory.prefetch_depth=-1"], ["memory.prefetch_depth", "expected a number >= 0"], id="prefetch-depth"),
    pytest.param(["memory.budget_gb=.nan"], ["memory.budget_gb: got nan; must be a finite number"], id="budget-nan"),
    pytest.param(["memory.budget_gb=.inf"], ["memory.budget_gb: got inf; must be a finite number"], id="budget-inf"),
    pytest.param(["train.lr=.nan"], ["train.lr: got nan; expected a finite number"], id="lr-nan"),
    pytest.param(["parallel.timeout_s=1e300"], ["parallel.timeout_s", "expected a number <= 10000000"], id="timeout-huge"),
    pytest.param(['run.output_dir=""'], ["run.output_dir", "an empty path would train into the current folder"],
                 id="empty-output-dir"),
])
def test_bad_override(capsys, cfg_path, overrides, expected):
    message = cli_error(capsys, "train", cfg_path, *overrides)
    for fragment in expected:
        assert fragment in message


@pytest.mark.parametrize("args", [["foo"], ["train.lr=1e-4", "foo"], ["train.max_steps", "5"]], ids=["word", "after-valid", "space-not-equals"])
def test_override_without_equals_is_named(capsys, cfg_path, args):
    # `longtune train cfg.yaml train.max_steps 5`: the first word without `=` is the culprit.
    message = cli_error(capsys, "train", cfg_path, *args)
    bad = next(a for a in args if "=" not in a)
    assert message == f"override {bad!r} is not of the form key.sub=value"


# --- the same mistakes written in the YAML file ---------------------------------------------------

def test_unknown_top_level_key_in_file(capsys, tmp_path, tiny_config):
    tiny_config["trian"] = tiny_config.pop("train")
    message = cli_error(capsys, "train", write_yaml(tmp_path / "c.yaml", tiny_config))
    assert message == "unknown key trian at the top level; did you mean train?"


def test_unknown_nested_key_in_file(capsys, tmp_path, tiny_config):
    tiny_config["train"]["max_step"] = tiny_config["train"].pop("max_steps")
    message = cli_error(capsys, "train", write_yaml(tmp_path / "c.yaml", tiny_config))
    assert message == "unknown key train.max_step in section train; did you mean train.max_steps?"


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "max_steps", "lots", "train.max_steps: got 'lots'; expected a valid integer"),
    ("data", "seq_len", 0, "data.seq_len: got 0; expected a number > 0"),
    ("data", "seq_len", -5, "data.seq_len: got -5; expected a number > 0"),
], ids=["not-an-int", "seq-len-zero", "seq-len-negative"])
def test_bad_value_in_file(capsys, tmp_path, tiny_config, section, key, value, expected):
    tiny_config[section][key] = value
    assert cli_error(capsys, "train", write_yaml(tmp_path / "c.yaml", tiny_config)).startswith(expected)


def test_missing_model_section(capsys, tmp_path, tiny_config):
    del tiny_config["model"]
    assert cli_error(capsys, "train", write_yaml(tmp_path / "c.yaml", tiny_config)) == "missing required key model"


# --- the config file itself ------------------------------------------------------------------------

@pytest.mark.parametrize("text, where, problem", [
    ("train:\n  max_steps: [1, 2\nrun: {}\n", "at line 3, column 4", "expected ',' or ']'"),
    ("train:\n\tmax_steps: 3\n", "at line 2, column 1", "found character '\\t' that cannot start any token"),
], ids=["unclosed-bracket", "tab-indent"])
def test_malformed_yaml_gives_line_and_column(capsys, tmp_path, text, where, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    message = cli_error(capsys, "train", path)
    assert message.startswith(f"malformed YAML in {path} {where}: ")
    assert problem in message


def test_top_level_must_be_a_mapping(capsys, tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- data\n")
    assert cli_error(capsys, "train", path) == f"{path}: the top level must be a mapping of sections, got list"


@pytest.mark.parametrize("name", ["no_such_config", "/nonexistent/dir/c.yaml"])
def test_config_file_not_found_lists_bundled_configs(capsys, name):
    message = cli_error(capsys, "train", name)
    assert message.startswith(f"config file not found: {name}; bundled configs: ")
    assert "quickstart" in message.split("bundled configs: ")[1].split(", ")


# --- model sources ---------------------------------------------------------------------------------

def test_model_path_and_config_both_set(capsys, cfg_path):
    message = cli_error(capsys, "train", cfg_path, "model.path=/nonexistent/model.gguf")
    assert message == "model: set exactly one of model.path (folder, .gguf, pkg://) and model.config (inline)"


def test_model_path_and_config_neither_set(capsys, cfg_path):
    message = cli_error(capsys, "train", cfg_path, "model.config=null")
    assert message.startswith("model: set exactly one of model.path")


def test_inline_config_without_model_type(capsys, cfg_path):
    message = cli_error(capsys, "train", cfg_path, "model.config={hidden_size: 32}")
    assert message == "model: model.config needs a model_type (llama, qwen2, qwen3, mistral)"


def test_inline_config_with_unsupported_model_type(capsys, cfg_path):
    message = cli_error(capsys, "train", cfg_path, "model.config.model_type=gpt2")
    assert message == "model.config.model_type: got 'gpt2'; expected one of ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma')"


def test_missing_model_file(capsys, cfg_path):
    message = cli_error(capsys, "train", cfg_path, "model.config=null", "model.path=/nonexistent/model.gguf")
    assert message == "model.path: /nonexistent/model.gguf does not exist"


def test_model_folder_without_config_json(capsys, cfg_path, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    message = cli_error(capsys, "train", cfg_path, "model.config=null", f"model.path={folder}")
    assert message == f"model.path: {folder} has no config.json"


def test_model_folder_of_gguf_files_suggests_gguf_file(capsys, cfg_path, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "tiny.Q4_1.gguf").write_bytes(b"")
    message = cli_error(capsys, "train", cfg_path, "model.config=null", f"model.path={folder}")
    assert message == f"model.path: {folder} has no config.json; set model.gguf_file to one of ['tiny.Q4_1.gguf']"


def test_gguf_file_missing_from_model_folder(capsys, cfg_path, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    message = cli_error(capsys, "train", cfg_path, "model.config=null", f"model.path={folder}", "model.gguf_file=nope.gguf")
    assert message == f"model.gguf_file: nope.gguf not found in {folder}"


def test_model_path_file_that_is_not_gguf(capsys, cfg_path):
    message = cli_error(capsys, "train", cfg_path, "model.config=null", f"model.path={cfg_path}")
    assert message.startswith(f"model.path: {cfg_path} is a file but not .gguf")


@pytest.mark.parametrize("make, expected", [
    (None, "does not exist"),
    ("folder", "has no tokenizer_config.json"),
], ids=["missing", "folder-without-tokenizer"])
def test_bad_tokenizer(capsys, cfg_path, tmp_path, make, expected):
    folder = tmp_path / "tok"
    if make:
        folder.mkdir()
    message = cli_error(capsys, "train", cfg_path, f"model.tokenizer={folder}")
    assert message.startswith(f"model.tokenizer: {folder} ") and message.endswith(expected)


# --- data and output folder ----------------------------------------------------------------------

def test_nonexistent_data_path(capsys, cfg_path):
    assert cli_error(capsys, "train", cfg_path, "data.kind=jsonl", "data.path=/nope") == "data.path: /nope does not exist"


@pytest.mark.parametrize("kind, suffixes", [("jsonl", ".jsonl/.json"), ("text", ".txt/.md"), ("parquet", ".parquet")])
def test_data_folder_without_matching_files(capsys, cfg_path, tmp_path, kind, suffixes):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "notes.csv").write_text("text\nhello\n")
    message = cli_error(capsys, "train", cfg_path, f"data.kind={kind}", f"data.path={folder}")
    assert message == f"data.path: no {suffixes} files under {folder}"


def test_unwritable_output_dir(capsys, cfg_path, tmp_path):
    # Tests run as root, so chmod does not stop writes; a parent that is a regular file does.
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "run"
    message = cli_error(capsys, "train", cfg_path, f"run.output_dir={out}")
    assert message.startswith(f"run.output_dir: cannot write to {out}: ")
    assert "Not a directory" in message


def test_output_dir_with_earlier_checkpoints_needs_resume(capsys, cfg_path, tmp_path, tiny_config):
    out = run_folder(tmp_path / "earlier", tiny_config, {2: True})
    message = cli_error(capsys, "train", cfg_path, f"run.output_dir={out}")
    assert message.startswith(f"run.output_dir {out} already holds checkpoints of an earlier run")
    assert "run.resume=auto" in message


# --- resume ----------------------------------------------------------------------------------------

def test_run_resume_of_incomplete_checkpoint(capsys, cfg_path, tmp_path, tiny_config):
    step = run_folder(tmp_path / "earlier", tiny_config, {4: False}) / "step_4"
    message = cli_error(capsys, "train", cfg_path, f"run.resume={step}")
    assert message == f"run.resume: checkpoint {step} is incomplete (no {COMPLETE} marker)"


def test_run_resume_of_missing_checkpoint(capsys, cfg_path, tmp_path):
    step = tmp_path / "earlier" / "step_9"
    assert cli_error(capsys, "train", cfg_path, f"run.resume={step}") == f"run.resume: checkpoint {step} does not exist"


def test_resume_of_missing_folder(capsys, tmp_path):
    folder = tmp_path / "nope"
    assert cli_error(capsys, "resume", folder) == f"longtune resume: run folder {folder} does not exist"


def test_resume_of_folder_that_is_not_a_run(capsys, tmp_path):
    assert cli_error(capsys, "resume", tmp_path) == f"longtune resume: {tmp_path} is not a longtune run folder (no config.resolved.yaml)"


def test_resume_overrides_are_validated(capsys, tmp_path, tiny_config):
    run = run_folder(tmp_path / "run", tiny_config)
    assert cli_error(capsys, "resume", run, "train.max_stepz=8") == \
        "unknown key train.max_stepz in section train; did you mean train.max_steps?"


# --- export: a path the user gave is exit 2; a run folder without what is asked for, exit 1 ------

def test_export_of_missing_folder(capsys, tmp_path):
    run = tmp_path / "nope"
    assert cli_error(capsys, "export", run, "--out", tmp_path / "out") == f"longtune export: run folder {run} does not exist"
    assert not (tmp_path / "out").exists()


def test_export_of_incomplete_step(capsys, tmp_path, tiny_config):
    run = run_folder(tmp_path / "run", tiny_config, {4: False, 2: True})
    message = cli_error(capsys, "export", run, "--out", tmp_path / "out", "--step", "4", code=1)
    assert message == f"{run} has no complete step_4; complete checkpoints: [2]"
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def export_without_complete_checkpoint(tmp_path_factory):
    """`longtune export` (a real process) of a run whose only checkpoint lacks the COMPLETE marker."""
    run = tmp_path_factory.mktemp("export") / "run"
    (run / "step_4").mkdir(parents=True)
    (run / "config.resolved.yaml").write_text("run: {output_dir: run}\n")
    return run, run_cli("export", run, "--out", run.parent / "out", timeout=120)


def test_export_without_complete_checkpoint_exits_1(export_without_complete_checkpoint):
    run, proc = export_without_complete_checkpoint
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1] == f"error: {run} holds no complete checkpoint"
    assert not (run.parent / "out").exists()


def test_export_without_complete_checkpoint_is_one_line(export_without_complete_checkpoint):
    _, proc = export_without_complete_checkpoint
    assert assert_one_error_line(proc, code=1)


# --- usage errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    ([], "longtune: the following arguments are required: command"),
    (["bogus"], "longtune: argument command: invalid choice: 'bogus'"),
    (["train", "quickstart", "--bogus"], "longtune: unrecognized arguments: --bogus"),
    (["resume"], "longtune resume: the following arguments are required: run_dir"),
    (["export", "runs/x"], "longtune export: the following arguments are required: --out"),
    (["export", "runs/x", "--out", "o", "--step", "abc"], "longtune export: argument --step: invalid int value: 'abc'"),
], ids=["no-subcommand", "unknown-subcommand", "unknown-option", "resume-without-folder", "export-without-out", "bad-step"])
def test_usage_error(capsys, argv, expected):
    message = cli_error(capsys, *argv)
    assert message.startswith(expected) and message.endswith("(see --help)")


# --- the real process: exit status and stderr as a user sees them ----------------------------------

def test_process_unknown_key_in_file(tmp_path, tiny_config):
    tiny_config["trian"] = tiny_config.pop("train")
    proc = run_cli("train", write_yaml(tmp_path / "c.yaml", tiny_config), timeout=120)
    assert assert_one_error_line(proc) == "unknown key trian at the top level; did you mean train?"


def test_process_missing_model_file(cfg_path):
    proc = run_cli("train", cfg_path, "model.config=null", "model.path=/nonexistent/model.gguf", timeout=120)
    assert assert_one_error_line(proc) == "model.path: /nonexistent/model.gguf does not exist"
    assert proc.stdout == ""


def test_process_no_subcommand():
    proc = run_cli(timeout=120)
    assert assert_one_error_line(proc).startswith("longtune: the following arguments are required: command")


def test_process_help():
    proc = run_cli("train", "--help", timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: longtune train") and "--print-config" in proc.stdout


# --- positive: --print-config shows the resolved, typed config --------------------------------------

def test_print_config_applies_typed_overrides(capsys, cfg_path):
    rc = main(["train", str(cfg_path), "train.max_steps=7", "train.lr=1e-4", "data.packing=false",
               "memory.prefetch_depth=2", "memory.budget_gb=2.5", "train.clip_grad_norm=null",
               "log.sinks=[console,jsonl]", "optim.betas=[0.9,0.99]", "--print-config"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    cfg = yaml.safe_load(out)
    assert cfg["train"]["max_steps"] == 7 and type(cfg["train"]["max_steps"]) is int
    assert cfg["train"]["lr"] == 0.0001 and type(cfg["train"]["lr"]) is float
    assert cfg["data"]["packing"] is False and cfg["memory"]["prefetch_depth"] == 2
    assert cfg["memory"]["budget_gb"] == 2.5
    assert cfg["train"]["clip_grad_norm"] is None
    assert cfg["log"]["sinks"] == ["console", "jsonl"]
    assert cfg["optim"]["betas"] == [0.9, 0.99]
    assert cfg["data"]["seq_len"] == 128  # untouched keys keep the file's value
    assert set(cfg) == {"model", "data", "train", "optim", "memory", "checkpoint", "run", "log", "parallel",
                        "launch", "adapter"}


def test_print_config_defaults_to_quickstart_when_only_overrides_are_given(capsys):
    # `longtune train train.max_steps=3` is `longtune train quickstart train.max_steps=3`.
    assert main(["train", "train.max_steps=3", "--print-config"]) == 0
    implicit = capsys.readouterr().out
    assert main(["train", "quickstart", "train.max_steps=3", "--print-config"]) == 0
    assert implicit == capsys.readouterr().out
    assert yaml.safe_load(implicit)["train"]["max_steps"] == 3


def test_resume_print_config_points_at_the_run(capsys, tmp_path, tiny_config):
    run = run_folder(tmp_path / "run", tiny_config)
    assert main(["resume", str(run), "train.max_steps=8", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["run"] == {"output_dir": str(run), "resume": "auto", "device": "auto"}
    assert cfg["train"]["max_steps"] == 8


# --- inputs that once escaped as tracebacks ------------------------------------------------------

def test_binary_config_file(capsys, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00\xc3\x28\xff\xfe")
    assert "model.gguf" in cli_error(capsys, "train", path)


def test_pkg_path_of_missing_parent_package(capsys, cfg_path):
    message = cli_error(capsys, "train", cfg_path, "model.tokenizer=pkg://no_such_pkg.sub/tok.gguf")
    assert message.startswith("model.tokenizer: ") and "no_such_pkg" in message


def test_folder_given_as_config(capsys, tmp_path):
    assert cli_error(capsys, "train", tmp_path) == f"config {tmp_path} is a folder; give a YAML file"


def test_pkg_path_without_a_file(capsys, cfg_path):
    message = cli_error(capsys, "train", cfg_path, "model.tokenizer=pkg://")
    assert message == "model.tokenizer: pkg:// is not of the form pkg://package/file"


def test_numeric_looking_override_of_a_string_key_stays_a_string(capsys, cfg_path):
    assert main(["train", str(cfg_path), "run.output_dir=2024", "data.text_field=1e5", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["run"]["output_dir"] == "2024" and cfg["data"]["text_field"] == "1e5"


def test_explicit_bad_resume_creates_no_output_dir(capsys, tmp_path, tiny_config):
    out = tmp_path / "never"
    tiny_config["run"] = {"output_dir": str(out), "resume": str(tmp_path / "step_4")}
    message = cli_error(capsys, "train", write_yaml(tmp_path / "c.yaml", tiny_config))
    assert message == f"run.resume: checkpoint {tmp_path / 'step_4'} does not exist"
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "plan"])
def test_nproc_zero_is_refused_not_run_as_one(capsys, cfg_path, command):
    """`--nproc 0` ran as 1 (argparse's 0 read as 'not given')."""
    assert "--nproc must be at least 1, got 0" in cli_error(capsys, command, cfg_path, "--nproc", "0")
