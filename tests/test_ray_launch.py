"""launch.backend=ray: `longtune train CFG launch.backend=ray` on Ray Train workers.

The story, on one local Ray cluster (started once for the module, every service on 127.0.0.1): two CPU workers
train; one of them is SIGKILLed mid-run; Ray restarts the group from the last checkpoint it registered and the
run ends with the losses of an uninterrupted run; a second `longtune train` with the same Ray name and storage
continues from Ray's latest checkpoint instead of starting over.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import read_metrics, run_cli, start_cli, train_losses, write_yaml

pytest.importorskip("ray.train")

MAX_STEPS = 8
# fp32 on the CPU: two ranks with one micro-batch each all-reduce the same two gradients that one process with
# grad_accum_steps=2 accumulates, each normalised by the step's total target count (trainer/train.py), so the
# runs agree to the rounding of that one sum's order; on this machine they agree bit for bit.
REL_TOL = 1e-6


def _ray_processes(root: psutil.Process, before: frozenset = frozenset()) -> list[psutil.Process]:
    """The cluster's processes: every descendant of the process that started it (gcs_server, raylet, workers),
    but those that were there before it (e.g. multiprocessing's resource tracker from earlier tests)."""
    return [p for p in root.children(recursive=True) if p.pid not in before and _alive(p)]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _train_workers(root: psutil.Process) -> list[psutil.Process]:
    """Ray Train's worker actors: Ray names each actor's process after its class (`ray::RayTrainWorker`); only
    this test's cluster is searched (the descendants of this process), never other users' processes."""
    out = []
    for p in _ray_processes(root):
        try:
            if (p.cmdline() or [""])[0].startswith("ray::RayTrainWorker"):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def ray_address():
    """One local cluster for the module, started by longtune's own launcher code; stopped at the end, and nothing
    of it left running."""
    from longtune.launch.ray_launch import start_local_cluster

    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    before = frozenset(p.pid for p in psutil.Process().children(recursive=True))
    start_local_cluster(num_cpus=2)
    import ray

    me = psutil.Process()
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if saved is None:  # start_local_cluster set it (the CLI drivers joining the cluster read it too)
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved
        deadline = time.monotonic() + 30
        while _ray_processes(me, before) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [(p.pid, p.name()) for p in _ray_processes(me, before)]
        assert not left, f"Ray processes left running after ray.shutdown: {left}"



def _last_step(run: Path) -> int:
    return max(train_losses(run), default=0) if (run / "metrics.jsonl").exists() else 0


def _registered(snapshot: Path) -> bool:
    """Ray has registered a checkpoint (its controller writes the snapshot once it has all ranks' report)."""
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (OSError, ValueError):
        return False


@pytest.mark.slow
def test_ray_worker_killed_resumes_and_rerun_continues(tiny_config, tmp_path, ray_address):
    start = time.monotonic()
    # Every service of the cluster listens on the loopback interface only.
    assert ray_address.startswith("127.0.0.1:"), ray_address
    me = psutil.Process()
    for p in _ray_processes(me):
        try:
            listening = [c.laddr.ip for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
        assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in listening), (p.name(), listening)

    cfg = tiny_config
    cfg["train"].update(max_steps=MAX_STEPS, grad_accum_steps=1)
    cfg["data"]["passkey"]["eval_samples"] = 0
    cfg["checkpoint"].update(every_n_steps=2, keep_last=2)
    cfg["run"]["device"] = "cpu"  # on a GPU machine too
    config = write_yaml(tmp_path / "config.yaml", cfg)

    # The reference: one process, two micro-batches a step = two data-parallel ranks of one micro-batch each.
    # Trained in this process, without a CLI start-up: only its losses are used.
    from longtune.trainer.config import validate
    from longtune.trainer.train import train

    ref = tmp_path / "reference"
    done = train(validate({**cfg, "train": {**cfg["train"], "grad_accum_steps": 2},
                           "run": {**cfg["run"], "output_dir": str(ref)}}))
    assert done.step == MAX_STEPS
    reference = train_losses(ref)
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))

    run, storage = tmp_path / "run", tmp_path / "ray-storage"
    ray_args = ["launch.backend=ray", f"launch.ray.address={ray_address}", "launch.ray.num_workers=2",
                "launch.ray.name=story", f"launch.ray.storage_path={storage}", f"run.output_dir={run}"]
    snapshot = storage / "story" / "checkpoint_manager_snapshot.json"

    # 1. Kill one Ray Train worker once step 3 is logged and Ray has registered a checkpoint (step 2 or 4): the
    #    restarted group must resume from Ray's checkpoint, not from the start nor from the run folder alone.
    proc = start_cli("train", config, *ray_args, "launch.ray.max_failures=1")
    try:
        deadline = time.monotonic() + 300
        while not (_last_step(run) >= 3 and _registered(snapshot)):
            assert proc.poll() is None, f"the run ended before the kill: {proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no step 3 and registered checkpoint within 300 s"
            time.sleep(0.05)
        workers = _train_workers(me)
        assert len(workers) == 2, [(p.pid, p.cmdline()[:1]) for p in workers]
        killed_at = _last_step(run)
        assert killed_at < MAX_STEPS, "the run finished before a worker could be killed"
        victim = workers[-1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    resumed = re.findall(r"resuming from Ray's checkpoint \S+ as (\S+)", out)
    assert len(resumed) == 1, out[-3000:]
    step = int(re.search(r"step_(\d+)$", resumed[0]).group(1))
    assert 2 <= step <= killed_at and step % 2 == 0, (step, killed_at)
    assert f"resumed from {run / f'step_{step}'} at step {step}" in out
    assert f"steps {step + 1}..{MAX_STEPS}" in out
    assert f"done: step {MAX_STEPS}" in out
    losses = train_losses(run)  # a step logged before the kill and again after keeps the later value
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    worst = max(abs(losses[s] - reference[s]) / abs(reference[s]) for s in reference)
    assert worst <= REL_TOL, {s: (losses[s], reference[s]) for s in reference}
    assert json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"] == MAX_STEPS
    assert not _train_workers(me), "the run's workers outlived it"

    # 2. The same command again with more steps: Ray hands back its latest checkpoint (step 8) and the run goes
    #    on from there; metrics.jsonl gains steps 9 and 10 only.
    logged_before = len(read_metrics(run))
    again = run_cli("train", config, *ray_args, "train.max_steps=10", timeout=400)
    assert again.returncode == 0, f"stdout:\n{again.stdout[-3000:]}\nstderr:\n{again.stderr[-3000:]}"
    assert f"resuming from Ray's checkpoint {storage / 'story' / f'step_{MAX_STEPS}'}" in again.stdout
    assert f"resumed from {run / f'step_{MAX_STEPS}'} at step {MAX_STEPS}" in again.stdout
    assert "steps 9..10" in again.stdout and "done: step 10" in again.stdout
    assert "Reporting training result" not in again.stdout + again.stderr  # Ray's per-report INFO line is muted
    new = [m["step"] for m in read_metrics(run)[logged_before:] if "loss" in m]
    assert new == [9, 10], new
    assert json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"] == 10
    print(f"ray story: killed at step {killed_at}, resumed from step {step}, worst relative loss difference "
          f"{worst:.2e}, {time.monotonic() - start:.0f} s")


def test_worker_errors_are_one_line():
    """A failed fit is one line per failing rank with the worker's own message (ConfigError when every rank
    refused the config), not Ray's traceback."""
    from ray.train import WorkerGroupError

    from longtune.launch.ray_launch import _failure
    from longtune.trainer.errors import ConfigError, RunError

    refused = _failure(WorkerGroupError("tb", {0: ConfigError("run.output_dir x is in use"), 1: ConfigError("same")}))
    assert isinstance(refused, ConfigError) and str(refused) == \
        "the Ray run failed: rank 0: run.output_dir x is in use; rank 1: same"
    crashed = _failure(WorkerGroupError("tb", {1: RuntimeError("Traceback (most recent call last):\n  x\nValueError: boom")}))
    assert isinstance(crashed, RunError) and str(crashed) == "the Ray run failed: rank 1: RuntimeError: ValueError: boom"


def test_without_ray_the_error_says_how_to_install(monkeypatch, tiny_config):
    from longtune.launch.ray_launch import run_on_ray
    from longtune.trainer.config import validate
    from longtune.trainer.errors import ConfigError

    cfg = validate({**tiny_config, "launch": {"backend": "ray", "ray": {"address": "auto"}}})
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"launch.backend=ray needs ray: pip install 'ray\[train\]'"):
        run_on_ray(cfg)
