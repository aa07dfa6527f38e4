"""No traceback, nothing silent (issue 27): what goes wrong around a run is one line naming what and where, with
the right exit code. Damaged torch distributed checkpoints, a full disk during an FSDP2 checkpoint write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from conftest import REPO, cli_env, write_yaml

FAULT_HOOK = REPO / "tests" / "fault_hook"


def _cli(*args, fault: dict | None = None) -> subprocess.Popen:
    """`longtune ARGS` started, with the fault hook on when `fault` is given (tests/fault_hook)."""
    env = cli_env()
    if fault:
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(FAULT_HOOK), env.get("PYTHONPATH")])),
                   LONGTUNE_TEST_FAULT=json.dumps(fault))
    return subprocess.Popen([sys.executable, "-m", "longtune.launch.cli", *map(str, args)], cwd=REPO, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line or "Traceback" in line]


def test_a_damaged_or_unwritable_distributed_checkpoint_is_one_line(tmp_path, tiny_config):
    """FSDP2 in one process writes a torch distributed checkpoint (dcp/); the disk fills during the second one.
    torch reports both a damaged checkpoint and a failed write as a CheckpointException, a BaseException that
    used to pass every handler as a traceback."""
    run = tmp_path / "run"
    cfg = tiny_config
    cfg["train"]["max_steps"] = 2
    cfg["data"]["passkey"]["eval_samples"] = 0
    cfg["checkpoint"].update(every_n_steps=1)
    cfg["parallel"] = {"strategy": "fsdp2"}
    cfg["run"].update(output_dir=str(run), device="cpu")
    # step_1's dcp/ holds ~38 MB: the disk is full in the middle of step_2's
    full = _cli("train", write_yaml(tmp_path / "fsdp2.yaml", cfg), fault={"file": ".distcp", "after": 50e6,
                                                                        "fault": "ENOSPC"})
    _, err = full.communicate(timeout=600)
    assert full.returncode == 1, err[-3000:]
    # (torch.save's zip writer reports the short write as "unexpected pos N vs M")
    assert _errors(err) == [f"error: could not write checkpoint {run}/step_2: the disk is full: torch.save could not "
                            f"write the whole file (free some space under {run}, or move run.output_dir)"], err[-3000:]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".", "step_"))) == ["step_1"]

    damaged = {}
    for name, damage in {"missing": lambda dcp: (dcp / "__0_0.distcp").unlink(),
                         "truncated": lambda dcp: os.truncate(dcp / ".metadata", 100)}.items():
        shutil.copytree(run, tmp_path / name)
        damage(tmp_path / name / "step_1" / "dcp")
        damaged[name] = _cli("export", tmp_path / name, "--out", tmp_path / f"{name}-export")
    for name, proc in damaged.items():
        _, err = proc.communicate(timeout=600)
        cause = {"missing": "dcp/__0_0.distcp is missing",
                 "truncated": "dcp/.metadata is damaged (UnpicklingError: pickle data was truncated)"}[name]
        assert proc.returncode == 1 and _errors(err) == [
            f"error: checkpoint {tmp_path / name}/step_1 is unreadable: {cause}"], err[-3000:]
        assert not (tmp_path / f"{name}-export").exists()


def test_a_resume_on_fewer_ranks_says_how_the_global_batch_changes_and_how_to_keep_it(tiny_config):
    from longtune.trainer.config import validate
    from longtune.trainer.train import global_batch_note

    saved = {"train": {"micro_batch_size": 1, "grad_accum_steps": 2}, "data": {"seq_len": 128}}
    cfg = validate(tiny_config)  # seq_len 128, grad_accum_steps 1
    assert global_batch_note(saved, cfg, 2, 1) == (
        "resuming a run of 2 process(es) on 1: the global batch changes from 512 to 128 tokens per step (to keep it, "
        "resume with train.grad_accum_steps=4); the data order goes on from the same global position")
    assert global_batch_note(saved, cfg, 3, 2).endswith(
        "from 768 to 256 tokens per step (to keep it, resume with train.grad_accum_steps=3); the data order goes on "
        "from the same global position")
    assert "no whole train.grad_accum_steps keeps it on 4 process(es)" in global_batch_note(saved, cfg, 3, 4)
    cfg.train.grad_accum_steps = 4
    assert global_batch_note(saved, cfg, 2, 1) is None  # kept
    assert global_batch_note({}, cfg, 2, 1) is None  # nothing to compare with
