"""No hang, no traceback, nothing silent (issue 27): a run stopped by SIGTERM (a scheduler's) or SIGINT, in one
process or under `--nproc 2`, or by a full disk, says so in one line, leaves no lock, temporary folder or partial
metrics line, and resumes bit for bit. Faults come from tests/fault_hook (a sitecustomize that makes writes to
one file fail as a full disk does, or sends SIGINT in the middle of one)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli_env, read_metrics, start_cli, train_losses, write_yaml

FAULT_HOOK = REPO / "tests" / "fault_hook"


def _config(tiny_config: dict, output_dir: Path, steps: int, every: int) -> dict:
    cfg = tiny_config
    cfg["train"].update(max_steps=steps, warmup_steps=1)
    cfg["data"]["passkey"]["eval_samples"] = 0
    cfg["checkpoint"].update(every_n_steps=every, keep_last=2)
    cfg["run"]["output_dir"] = str(output_dir)
    return cfg


def _faulty(*args, fault: dict) -> subprocess.Popen:
    """`longtune ARGS` started with the fault hook on."""
    env = cli_env()
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(FAULT_HOOK), env.get("PYTHONPATH")])),
               LONGTUNE_TEST_FAULT=json.dumps(fault))
    return subprocess.Popen([sys.executable, "-m", "longtune.launch.cli", *map(str, args)], cwd=REPO, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _signal_after_a_new_step(proc: subprocess.Popen, run: Path, sig: int) -> None:
    """Send `sig` to `proc` once it has logged a step more than the run folder held when it started."""
    before = len(read_metrics(run)) if (run / "metrics.jsonl").exists() else 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len(read_metrics(run)) > before:
            proc.send_signal(sig)
            return
        time.sleep(0.01)
    raise AssertionError(f"no step logged to signal after: {proc.communicate()[1][-2000:]}")


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line or "Traceback" in line]


def _left_behind(run: Path) -> list[str]:
    """A lock, temporary checkpoint folders or files, checkpoints without their COMPLETE marker."""
    return sorted(p.name for p in run.iterdir() if p.name == ".lock" or ".tmp" in p.name
                  or (p.name.startswith("step_") and not (p / "COMPLETE").exists()))


def test_sigint_in_a_checkpoint_write_and_sigterm_stop_one_process_cleanly_and_it_resumes_bitwise(tmp_path,
                                                                                                 tiny_config):
    straight_dir, run = tmp_path / "straight", tmp_path / "run"
    straight = start_cli("train", write_yaml(tmp_path / "straight.yaml", _config(dict(tiny_config), straight_dir, 6, 2)))
    config = write_yaml(tmp_path / "run.yaml", _config(dict(tiny_config), run, 6, 2))
    try:
        # Ctrl-C while step_2's optimizer.pt is written (torch.save used to report it as "unexpected pos")
        interrupted = _faulty("train", config, fault={"file": ".tmp-step_2", "after": 1000, "fault": "SIGINT"})
        _, err = interrupted.communicate(timeout=600)
        assert interrupted.returncode == 130, err[-3000:]
        assert _errors(err) == [f"error: interrupted (SIGINT): nothing half-written is left; longtune resume {run} "
                                "goes on from its newest complete checkpoint"], err[-3000:]
        assert _left_behind(run) == [] and not list(run.glob("step_*")), sorted(p.name for p in run.iterdir())

        # SIGTERM: a checkpoint at the next step boundary, then exit 143
        resumed = start_cli("resume", run)
        _signal_after_a_new_step(resumed, run, signal.SIGTERM)
        _, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 143, err[-3000:]
        (line,) = _errors(err)
        m = re.fullmatch(rf"error: stopped by SIGTERM after step (\d+): checkpoint {run}/step_(\d+) saved; continue "
                         rf"with: longtune resume {run}", line)
        assert m and m[1] == m[2] and (run / f"step_{m[1]}" / "COMPLETE").is_file(), line
        assert _left_behind(run) == [], sorted(p.name for p in run.iterdir())

        with open(run / "metrics.jsonl", "a") as f:  # what a writer killed in the middle of a line leaves
            f.write('{"step": 99, "lo')

        done = start_cli("resume", run)
        out, err = done.communicate(timeout=600)
        assert done.returncode == 0 and _errors(err) == [], err[-3000:]
        _, err = straight.communicate(timeout=600)
        assert straight.returncode == 0, err[-3000:]
    finally:
        for p in (straight, locals().get("done")):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    losses = train_losses(run)  # every line parses: the partial one was dropped on resume
    assert losses == train_losses(straight_dir) and sorted(losses) == list(range(1, 7))
    assert _left_behind(run) == []


def test_sigterm_to_the_nproc_2_launcher_stops_every_rank_with_a_checkpoint(tmp_path, tiny_config):
    """SIGTERM to `longtune train --nproc 2` (Kubernetes sends it to the container's first process): the launcher
    passes it on, the ranks save at their next step boundary (checkpoint.every_n_steps=0: the final one alone
    otherwise) and stop; one line, exit 143, then a bitwise resume."""
    straight_dir, run, alone_dir = tmp_path / "straight", tmp_path / "run", tmp_path / "alone"
    launch = ["--nproc", "2", "run.device=cpu", "parallel.strategy=ddp"]
    straight = start_cli("train", write_yaml(tmp_path / "straight.yaml", _config(dict(tiny_config), straight_dir, 6, 0)),
                         *launch)
    proc = start_cli("train", write_yaml(tmp_path / "run.yaml", _config(dict(tiny_config), run, 6, 0)), *launch)
    try:
        _signal_after_a_new_step(proc, run, signal.SIGTERM)
        started = time.monotonic()
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 143 and time.monotonic() - started < 60, err[-3000:]
        (line,) = _errors(err)
        m = re.fullmatch(rf"\[rank 0\] error: stopped by SIGTERM after step (\d+): checkpoint {run}/step_\1 saved; "
                         rf"continue with: longtune resume {run}", line)
        assert m and int(m[1]) < 6, err[-3000:]
        assert _left_behind(run) == [], sorted(p.name for p in run.iterdir())
        # The DDP checkpoint holds all one process needs: resumed in one (no process group: the single strategy),
        # with the accumulation that keeps the global batch, it goes on as the two ranks do (to the all-reduce's
        # rounding). Without it, a line says the global batch changes (test_failure_messages.py). That run goes on
        # in a copy of the run folder, beside the two ranks' resume.
        shutil.copytree(run, alone_dir)
        resumed = start_cli("resume", run, *launch[:2])
        alone = start_cli("resume", alone_dir / f"step_{m[1]}", "train.grad_accum_steps=2")
        _, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0 and _errors(err) == [], err[-3000:]
        out, alone_err = alone.communicate(timeout=600)
        _, err = straight.communicate(timeout=600)
        assert straight.returncode == 0, err[-3000:]
    finally:
        for p in (straight, proc, locals().get("resumed"), locals().get("alone")):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    two_ranks = train_losses(run)
    assert two_ranks == train_losses(straight_dir) and sorted(two_ranks) == list(range(1, 7))
    assert _left_behind(run) == []

    assert alone.returncode == 0 and _errors(alone_err) == [] and "global batch" not in alone_err, alone_err[-3000:]
    assert "parallel.strategy=ddp in one process: training as one process (parallel.strategy=single, the same steps " \
           "without a process group)" in out.splitlines()
    one = train_losses(alone_dir)
    assert sorted(one) == list(range(1, 7))
    for step in range(int(m[1]) + 1, 7):
        assert one[step] == pytest.approx(two_ranks[step], rel=2e-6), step


def test_a_full_disk_prunes_first_what_keep_last_would_prune_or_says_what_helps(tmp_path, monkeypatch, capsys):
    """Old checkpoints are pruned before a write the disk cannot hold when keep_last prunes them afterwards
    anyway; the newest complete one always stays until the new one is complete."""
    import shutil

    from longtune.trainer import checkpoint as ckpt
    from longtune.trainer.errors import CheckpointError

    model = torch.nn.Linear(512, 512)  # a 3 MB checkpoint: the 1 MiB of slack the check adds is the smaller part
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.ones(1, 512)).sum().backward()
    optimizer.step()

    def save(step: int, keep: int, run: Path = tmp_path / "run"):
        run.mkdir(exist_ok=True)
        ckpt.save_checkpoint(run, ckpt.TrainState(step=step, data={}), model, optimizer, scheduler, "", keep)

    real = shutil.disk_usage(tmp_path)

    def disk_with(free: int) -> None:  # a disk with `free` bytes left now; what is removed frees its bytes
        used = lambda: sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())  # noqa: E731
        at = used()
        monkeypatch.setattr(shutil, "disk_usage", lambda path: real._replace(free=free + at - used()))

    def steps(run: Path = tmp_path / "run") -> list[str]:
        return sorted(p.name for p in run.iterdir())

    for step in (1, 2, 3):
        save(step, 3)
    disk_with(0)  # room once step_1 and step_2 are gone, which keep_last=2 prunes after the write anyway
    save(4, 2)
    assert steps() == ["step_3", "step_4"]
    assert "had 0.00 GB free and checkpoint step_4 needs 0.00 GB: removed step_1, step_2 first (checkpoint.keep_last" \
        "=2 prunes them once it is complete anyway)" in capsys.readouterr().out.replace("0.01 GB", "0.00 GB")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real)
    save(5, 3)
    disk_with(0)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step_6: it needs 0.0\d GB and 0.00 GB are "
                                              r"free under .* \(free some space, move run.output_dir, or lower "
                                              r"checkpoint.keep_last to 2\)$"):
        save(6, 3)  # keep_last=3 keeps step_4 and step_5 while step_6 is written: keep_last=2 would make room
    assert steps() == ["step_3", "step_4", "step_5"]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real)
    save(1, 1, tmp_path / "one")
    disk_with(0)
    with pytest.raises(CheckpointError, match=r"\(free some space or move run.output_dir\)$"):
        save(2, 1, tmp_path / "one")  # the newest complete checkpoint stays, whatever keep_last says
    assert steps(tmp_path / "one") == ["step_1"]


def test_a_full_disk_leaves_metrics_jsonl_whole_and_names_it(tmp_path):
    """A metrics line the disk cannot take (written in part, as write(2) does) is cut off again and the error names
    the file; a partial last line found when a run resumes (a writer killed mid-line) is dropped."""
    import errno

    from longtune.trainer.errors import RunError
    from longtune.trainer.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, ["jsonl"], 10)
    logger.log(1, {"loss": 1.0})
    raw = logger.jsonl

    class FullDisk:  # a raw file on a disk with 10 bytes left
        def __init__(self):
            self.left = 10

        def write(self, data):
            if not self.left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n, self.left = min(len(data), self.left), self.left - min(len(data), self.left)
            return raw.write(data[:n])

        def __getattr__(self, name):
            return getattr(raw, name)

    logger.jsonl = FullDisk()
    with pytest.raises(RunError, match=rf"^could not write {tmp_path}/metrics.jsonl: No space left on device \(free "
                                       r"some space, or move run.output_dir\)$"):
        logger.log(2, {"loss": 2.0})
    logger.jsonl = raw
    logger.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')
    MetricsLogger(tmp_path, ["jsonl"], 10, start_step=1).close()  # a resumed run
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
