"""Resume exactness: a run killed with SIGKILL and resumed equals the uninterrupted run bit for bit."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from conftest import run_cli, start_cli, train_losses, write_yaml

from longtune.trainer.checkpoint import COMPLETE, is_complete, list_checkpoints, load_checkpoint
from longtune.trainer.config import validate
from longtune.trainer.model import build_model
from longtune.trainer.train import train


def _resume_config(tiny_config: dict, output_dir) -> dict:
    cfg = tiny_config
    # Longer sequences than the default tiny config, so one step takes long enough
    # (~0.2 s) for the test to kill the run after step 6 and before step 8.
    cfg["data"]["seq_len"] = 512
    cfg["model"]["config"]["hidden_size"] = 64
    cfg["model"]["config"]["intermediate_size"] = 128
    cfg["train"].update(max_steps=12, grad_accum_steps=2, warmup_steps=2)
    cfg["checkpoint"].update(every_n_steps=4, keep_last=3)
    cfg["run"]["output_dir"] = str(output_dir)
    return cfg


def _kill_after_step(config_path, run_dir, step: int) -> None:
    proc = start_cli("train", config_path, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if (run_dir / "metrics.jsonl").exists() and step in train_losses(run_dir):
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-2000:]}")
            time.sleep(0.01)
        else:
            raise AssertionError(f"step {step} never logged")
    finally:
        proc.kill()
        proc.wait()


def test_sigkill_then_resume_matches_uninterrupted_run_bitwise(tmp_path, tiny_config):
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight_cfg = write_yaml(tmp_path / "straight.yaml", _resume_config(dict(tiny_config), straight_dir))
    # The uninterrupted run trains beside the killed one and its resume (its losses are read at the end).
    straight_proc = start_cli("train", straight_cfg, stdout=subprocess.DEVNULL)
    try:
        killed_cfg = write_yaml(tmp_path / "killed.yaml", _resume_config(dict(tiny_config), killed_dir))
        _kill_after_step(killed_cfg, killed_dir, 6)
        complete = [s for s, p in list_checkpoints(killed_dir) if is_complete(p)]
        assert complete == [4], f"expected only step_4 complete after the kill, found {complete}"

        # A newer checkpoint folder without COMPLETE (as a crash mid-save leaves) must be skipped:
        # its weights are garbage, so loading it would fail or change the losses.
        fake = killed_dir / "step_8"
        fake.mkdir()
        (fake / "model.safetensors").write_bytes(b"not a checkpoint")

        result = run_cli("resume", killed_dir)
        _, err = straight_proc.communicate(timeout=600)
    finally:
        if straight_proc.poll() is None:
            straight_proc.kill()
            straight_proc.communicate()
    assert straight_proc.returncode == 0, err[-3000:]
    straight = train_losses(straight_dir)
    assert sorted(straight) == list(range(1, 13))
    assert result.returncode == 0, result.stderr
    assert "skipping incomplete checkpoint" in result.stderr
    assert "resumed from" in result.stdout and "step_4 at step 4" in result.stdout
    resumed = train_losses(killed_dir)
    for step in range(5, 13):
        assert resumed[step] == straight[step], f"step {step}: {resumed[step]!r} != {straight[step]!r}"
    assert is_complete(killed_dir / "step_12") and (killed_dir / "step_8" / COMPLETE).is_file()


def test_resume_continues_with_a_larger_max_steps(tmp_path, tiny_config):
    """`longtune resume RUN train.max_steps=N` extends a finished run from its last checkpoint."""
    tiny_config["train"]["max_steps"] = 3
    tiny_config["checkpoint"]["every_n_steps"] = 0  # only the final checkpoint
    run_dir = tmp_path / "run"
    tiny_config["run"]["output_dir"] = str(run_dir)
    train(validate(tiny_config))  # the finished run, trained in this process: the resume is what is looked at
    result = run_cli("resume", run_dir, "train.max_steps=5")
    assert result.returncode == 0, result.stderr
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4, 5]
    assert is_complete(run_dir / "step_5")


def test_new_run_into_a_used_output_dir_is_refused(tmp_path, tiny_config):
    tiny_config["train"]["max_steps"] = 1
    path = write_yaml(tmp_path / "c.yaml", tiny_config)
    train(validate(tiny_config))  # a run that holds a checkpoint, trained in this process
    again = run_cli("train", path)
    assert again.returncode == 2
    assert "already holds checkpoints" in again.stderr and "run.resume=auto" in again.stderr


def test_disk_full_during_a_checkpoint_is_one_clear_error_and_the_last_checkpoint_survives(tmp_path, tiny_config):
    """A real full disk: a 60 MB tmpfs holds the step 2 checkpoint (~38 MB) but not step 4, which is refused
    before a byte of it is written (the ENOSPC of a write itself: tests/test_checkpoint.py)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mount_point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run_dir = mount_point / "run"
        tiny_config["train"]["max_steps"] = 6
        tiny_config["checkpoint"].update(every_n_steps=2, keep_last=5)
        tiny_config["run"]["output_dir"] = str(run_dir)
        result = run_cli("train", write_yaml(tmp_path / "c.yaml", tiny_config))
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: could not write checkpoint {run_dir / 'step_4'}: it needs 0.04 GB and 0.0")
        assert "GB are free under" in last
        assert sorted(p.name for p in run_dir.iterdir() if "step" in p.name) == ["step_2"], "no temp folder, no step_4"
        assert load_checkpoint(run_dir / "step_2", build_model(validate(tiny_config).model, checkpoint=run_dir / "step_2")).step == 2
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)
