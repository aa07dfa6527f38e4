"""Nothing lost: a run killed with SIGKILL again and again (at random moments, during checkpoint writes, during
start-up) and resumed each time ends with the uninterrupted run's losses bit for bit, and leaves no temporary
folder, file or lock behind. A second `longtune train` on a folder in use refuses, naming the owner's pid."""

from __future__ import annotations

import copy
import random
import signal
import subprocess
import time
from pathlib import Path

from conftest import run_cli, start_cli, train_losses, write_yaml

KILLS = 10
# Enough steps that the run is still going at the tenth kill: a start trains a step or two past the last one
# logged before a checkpoint-write or random kill, and none before a start-up kill on a 2-core machine (about 8
# steps over the ten kills there; the first run is still starting up while the second one refuses).
MAX_STEPS = 24


def _config(tiny_config: dict, output_dir: Path) -> dict:
    cfg = tiny_config
    cfg["train"].update(max_steps=MAX_STEPS, grad_accum_steps=1, warmup_steps=2)
    cfg["data"]["passkey"]["eval_samples"] = 0
    cfg["checkpoint"].update(every_n_steps=1, keep_last=2)  # a checkpoint write at every step: many to kill
    cfg["run"]["output_dir"] = str(output_dir)
    return cfg



def _temporaries(run: Path) -> list[str]:
    """Every temporary entry: checkpoint folders being written, and small files being replaced."""
    return [p.name for p in run.iterdir() if ".tmp" in p.name] if run.is_dir() else []


def _checkpoint_writes(run: Path) -> list[str]:
    return [p.name for p in run.iterdir() if p.name.startswith(".tmp-step_")] if run.is_dir() else []


def _logged_steps(run: Path) -> int:
    return len(train_losses(run)) if (run / "metrics.jsonl").exists() else 0


def _wait_and_kill(proc: subprocess.Popen, run: Path, how: str, rng: random.Random) -> bool:
    """Kill `proc` with SIGKILL at the moment `how` names; False if it finished first."""
    deadline = time.monotonic() + 240
    start_steps = _logged_steps(run)
    wait_until = time.monotonic() + rng.uniform(0.2, 3.0) if how == "start-up" else None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if how == "checkpoint-write" and _checkpoint_writes(run):
            break
        if how == "start-up" and time.monotonic() >= wait_until:
            break
        if how == "random" and _logged_steps(run) > start_steps:
            time.sleep(rng.uniform(0.0, 0.3))
            break
        time.sleep(0.001 if how == "checkpoint-write" else 0.02)
    else:
        raise AssertionError(f"nothing to kill at {how} within 240 s")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_kill_loop_then_resume_is_bitwise_and_leaves_nothing(tmp_path, tiny_config):
    straight_dir, run = tmp_path / "straight", tmp_path / "killed"
    # The uninterrupted run trains beside the kill loop, whose processes run one at a time and mostly start up:
    # its losses are read at the end. It writes no checkpoint (a write changes nothing the run computes): 24 of
    # them, each fsynced, were most of its work.
    straight_cfg = _config(copy.deepcopy(tiny_config), straight_dir)
    straight_cfg["checkpoint"].update(every_n_steps=0, save_final=False)
    straight_proc = start_cli("train", write_yaml(tmp_path / "straight.yaml", straight_cfg))
    proc = None
    try:
        rng = random.Random(0)
        config = write_yaml(tmp_path / "killed.yaml", _config(dict(tiny_config), run))
        proc = start_cli("train", config)
        # The folder is in use: a second run refuses at once, naming the first's pid, and changes nothing. It starts
        # as soon as the first holds the lock, and starts up while the first does.
        _locked_soon(run, proc)
        second = run_cli("train", config)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert second.stderr.splitlines() == [f"error: run.output_dir {run} is in use by pid {proc.pid} on "
                                              f"{_host()} since {_owner_since(run)}: wait for it to finish, or pick another run.output_dir"]
        _logged_steps_soon(run, proc)

        kills, stdout, mid_write = {"random": 0, "checkpoint-write": 0, "start-up": 0}, [], 0
        for how in ["checkpoint-write", "random", "start-up"] * KILLS:
            if sum(kills.values()) >= KILLS:
                break
            if not _wait_and_kill(proc, run, how, rng):
                raise AssertionError(f"the run finished before kill {sum(kills.values()) + 1}: {proc.stderr.read()[-2000:]}")
            kills[how] += 1
            mid_write += bool(_checkpoint_writes(run))  # the dead writer's half-written checkpoint is still there
            stdout.append(proc.stdout.read())
            assert "Traceback" not in proc.stderr.read()
            proc = start_cli("resume", run)
        assert sum(kills.values()) >= KILLS and mid_write >= 2, (kills, mid_write)

        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err
        stdout.append(out)
        _, straight_err = straight_proc.communicate(timeout=600)
        assert straight_proc.returncode == 0, straight_err
    finally:
        for p in (straight_proc, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    straight = train_losses(straight_dir)
    assert sorted(straight) == list(range(1, MAX_STEPS + 1))
    # Each start after a kill took the dead owner's lock over, and what killed writers left was removed (and said).
    assert "run folder lock taken over from pid" in out, out[:2000]
    assert any("left by interrupted runs" in o for o in stdout)
    resumed = train_losses(run)
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
    for step in range(1, MAX_STEPS + 1):
        assert resumed[step] == straight[step], f"step {step}: {resumed[step]!r} != {straight[step]!r}"
    assert _temporaries(run) == [] and not (run / ".lock").exists(), sorted(p.name for p in run.iterdir())
    assert sorted(p.name for p in run.glob("step_*")) == [f"step_{MAX_STEPS - 1}", f"step_{MAX_STEPS}"]


def _logged_steps_soon(run: Path, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if _logged_steps(run):
            return True
        time.sleep(0.02)
    raise AssertionError(f"the first run logged no step: {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")


def _locked_soon(run: Path, proc: subprocess.Popen) -> None:
    """Until `proc` holds the run folder's lock (the file names its owner once the lock is taken)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if f"pid {proc.pid} " in (run / ".lock").read_text():
                return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"the first run took no lock: {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")


def _host() -> str:
    import socket

    return socket.gethostname()


def _owner_since(run: Path) -> str:
    return (run / ".lock").read_text().strip().split(" since ", 1)[1]
