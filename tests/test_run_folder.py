"""Who owns a run folder, and what dead writers leave in it: the lock and the stale-temporary cleanup."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from conftest import cli_env

from longtune.trainer.errors import ConfigError
from longtune.trainer.inputs import RunLock, remove_stale_temporaries, stale_temporaries, temp_name, write_atomic


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid now (pids are not reused this soon)


def test_lock_refuses_a_second_owner_and_names_the_first(tmp_path):
    first = RunLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(ConfigError, match=rf"is in use by pid {os.getpid()} on {socket.gethostname()} since "):
        RunLock(tmp_path).acquire()  # flock is per open file: a second lock in one process conflicts too
    first.release()
    assert not (tmp_path / ".lock").exists()  # a finished run leaves no trace
    second = RunLock(tmp_path)
    assert second.acquire() is None
    second.release()


def test_lock_of_a_dead_owner_is_taken_over_with_a_notice(tmp_path):
    # What a run killed with SIGKILL leaves: the file with its owner's line, no flock (the kernel dropped it).
    (tmp_path / ".lock").write_text(f"pid {_dead_pid()} on {socket.gethostname()} since 2026-12-02 10:00:00\n")
    lock = RunLock(tmp_path)
    notice = lock.acquire()
    assert notice.startswith("run folder lock taken over from pid ") and "no longer running" in notice
    assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()} ")
    lock.release()


def test_lock_held_by_another_live_process_refuses(tmp_path):
    code = ("import sys, time; from longtune.trainer.inputs import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=cli_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by pid {holder.pid} "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path)
    assert f"taken over from pid {holder.pid} " in lock.acquire()
    lock.release()


def test_stale_temporaries_are_those_of_dead_writers_only(tmp_path):
    host, dead = socket.gethostname(), _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f".tmp-step_4-{host}-{dead}": "dead writer on this host",
            f".tmp-step_5-{dead}": "dead writer, older name without host",
            f".tmp-step_6-other-host-{live.pid}": "another host's (the lock is ours, so it is not writing)",
            f".config.resolved.yaml.tmp-{host}-{dead}": "a small file's write",
        }
        kept = [f".tmp-step_7-{host}-{live.pid}", temp_name(8), "step_3", ".write-test-x", "plan.yaml"]
        for name in [*names, *kept]:
            if "yaml" in name:
                (tmp_path / name).write_text("x" * 10)
            else:
                (tmp_path / name).mkdir()
                (tmp_path / name / "model.safetensors").write_bytes(b"x" * 1000)
        assert sorted(p.name for p in stale_temporaries(tmp_path)) == sorted(names)
        assert remove_stale_temporaries(tmp_path) == (len(names), 3 * 1000 + 10)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    finally:
        live.kill()
        live.wait()


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "config.resolved.yaml"
    path.write_text("old\n")
    write_atomic(path, "new\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.resolved.yaml"]
