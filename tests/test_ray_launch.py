"""launch.backend=ray: `longtune train CFG launch.backend=ray` on Ray Train workers.

The story, on one local Ray cluster (started once for the module, every service on 127.0.0.1): two CPU workers
train; one of them is SIGKILLed mid-run; Ray restarts the group from the last checkpoint it registered and the
run ends with the losses of an uninterrupted run; a second `longtune train` with the same Ray name and storage
continues from Ray's latest checkpoint instead of starting over.

Issue 27 (no hang, no traceback, nothing silent), on the same cluster: resources the cluster lacks are refused
before a worker starts (Ray Train would wait for them forever); a ConfigError on a worker ends the run at once
even with max_failures=-1, in one line without the workers' tracebacks. Config-only refusals (address, name,
storage, amounts, world size) are checked without Ray at all.
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

    names = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    saved = {k: os.environ.get(k) for k in names}
    before = frozenset(p.pid for p in psutil.Process().children(recursive=True))
    start_local_cluster(num_cpus=2)
    import ray

    me = psutil.Process()
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for k, v in saved.items():  # start_local_cluster set them (the CLI drivers joining the cluster read them too)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        deadline = time.monotonic() + 30
        while _ray_processes(me, before) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [(p.pid, p.name()) for p in _ray_processes(me, before)]
        assert not left, f"Ray processes left running after ray.shutdown: {left}"



# Ray Train's controller polls its worker group every 2 s (a finished, failed or dead worker is noticed at the next
# poll); the drivers of the runs below poll every 0.2 s, which Ray passes on to the controller (ray.train.v2's
# propagated variables).
FAST_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


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
    proc = start_cli("train", config, *ray_args, "launch.ray.max_failures=1", env=FAST_POLL)
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
    # Ray's checkpoint, or the run folder's newer one when the kill fell between its COMPLETE and Ray's copy
    resumed = re.findall(r"resuming from (?:Ray's checkpoint \S+ as |the run folder's newest complete checkpoint )"
                         r"(\S+)", out)
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
    again = run_cli("train", config, *ray_args, "train.max_steps=10", timeout=400, env=FAST_POLL)
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
    """A failed fit is one line with the workers' own messages (ranks that failed alike named together), not Ray's
    traceback; a ConfigError on any rank is the run's error (exit 2), the other ranks' collateral errors left out."""
    from ray.train import WorkerGroupError

    from longtune.launch.ray_launch import _failure
    from longtune.trainer.errors import ConfigError, RunError

    refused = _failure(WorkerGroupError("tb", {0: ConfigError("run.output_dir x is in use"), 1: ConfigError("same")}))
    assert isinstance(refused, ConfigError) and str(refused) == \
        "the Ray run failed: rank 0: run.output_dir x is in use; rank 1: same"
    alike = _failure(WorkerGroupError("tb", {0: ConfigError("bad"), 1: RuntimeError("gloo: connection closed"),
                                             2: ConfigError("bad")}))
    assert isinstance(alike, ConfigError) and str(alike) == "the Ray run failed: ranks 0, 2: bad"
    crashed = _failure(WorkerGroupError("tb", {1: RuntimeError("Traceback (most recent call last):\n  x\nValueError: boom")}))
    assert isinstance(crashed, RunError) and str(crashed) == "the Ray run failed: rank 1: RuntimeError: ValueError: boom"


def test_a_config_error_is_not_retried_a_fault_is():
    """launch.ray.max_failures=-1 retried a ConfigError forever: the failure policy raises it at once, and leaves
    a lost worker (or a crash) to Ray's own policy."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.execution.failure_handling import FailureDecision

    from longtune.launch.ray_launch import ConfigErrorsEndTheRun
    from longtune.trainer.errors import ConfigError

    class Ray:  # Ray's policy with max_failures=-1: retry everything
        failure_config = "theirs"

        def make_decision(self, error):
            return FailureDecision.RETRY

    policy = ConfigErrorsEndTheRun(Ray())
    assert policy.failure_config == "theirs"
    config = WorkerGroupError("tb", {0: ConfigError("run.output_dir x is in use"), 1: RuntimeError("gloo")})
    assert policy.make_decision(config) == FailureDecision.RAISE
    fault = WorkerGroupError("tb", {1: RuntimeError("The actor died unexpectedly")})
    assert policy.make_decision(fault) == FailureDecision.RETRY


def test_launch_keys_refused_before_ray_is_imported(monkeypatch, tiny_config, tmp_path):
    """Each malformed launch.ray key (and a world the trainer would refuse) is a ConfigError naming it, before
    Ray is even imported: no cluster starts, nothing is written (a name with .. wrote outside storage_path)."""
    from longtune.launch.ray_launch import run_on_ray
    from longtune.trainer.config import validate
    from longtune.trainer.errors import ConfigError

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = {
        "launch.ray.address=notaurl": {"ray": {"address": "notaurl"}},
        "launch.ray.address=127.0.0.1:99999": {"ray": {"address": "127.0.0.1:99999"}},
        "launch.ray.name='../../escaped'": {"ray": {"name": "../../escaped"}},
        "launch.ray.name='a/b'": {"ray": {"name": "a/b"}},
        f"launch.ray.storage_path {a_file} is a file": {"ray": {"storage_path": str(a_file)}},
        f"launch.ray.storage_path {a_file / 'sub'}: {a_file} is a file": {"ray": {"storage_path": str(a_file / "sub")}},
        "launch.ray.resources_per_worker.CPU=-1": {"ray": {"resources_per_worker": {"CPU": -1}}},
        "launch.ray.resources_per_worker asks for GPU: 1 per worker, but launch.ray.use_gpu=false":
            {"ray": {"use_gpu": False, "resources_per_worker": {"GPU": 1}}},
        "parallel.strategy=single runs one process, but launch.ray.num_workers=2": {"strategy": "single"},
        "parallel.sequence_parallel=2 does not divide launch.ray.num_workers=3":
            {"ray": {"num_workers": 3}, "sequence_parallel": 2},
    }
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    cases[f"launch.ray.storage_path {read_only / 'ray'}: cannot write in {read_only}"] = \
        {"ray": {"storage_path": str(read_only / "ray")}}
    cases["launch.ray.use_gpu=true gives each worker a GPU, but run.device=cpu"] = \
        {"ray": {"use_gpu": True}, "run": {"device": "cpu"}}
    if os.geteuid() == 0:  # root writes anywhere: the folder answers as a read-only filesystem would
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != read_only and access(p, mode))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError: the refusal must come first
    for expected, given in cases.items():
        launch = {"backend": "ray", "ray": given.get("ray", {})}
        parallel = {k: v for k, v in given.items() if k not in ("ray", "run")}
        cfg = validate({**tiny_config, "launch": launch, "parallel": parallel,
                        "run": {**tiny_config["run"], **given.get("run", {})}})
        with pytest.raises(ConfigError) as refused:
            run_on_ray(cfg)
        assert str(refused.value).startswith(expected), (expected, str(refused.value))
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "run").exists()

    # Through the CLI: exit 2, one line, in about a second.
    out = run_cli("train", write_yaml(tmp_path / "config.yaml", tiny_config), "launch.backend=ray",
                  "launch.ray.name=../../escaped", timeout=60)
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "error: launch.ray.name='../../escaped' is not a name: Ray keeps the run in storage_path/NAME, so it is one "
        "folder name (no /, \\ or ..)"], out.stderr


def test_resources_the_cluster_lacks(tiny_config):
    """What a worker asks that no node has, or more than all of them hold: the one line names the key, the amount
    and what the cluster has (Ray would wait for it forever)."""
    from longtune.launch.ray_checks import unavailable
    from longtune.trainer.config import validate

    def why(use_gpu=False, nodes=({"CPU": 2.0, "memory": 4 * 2.0**30, "node:127.0.0.1": 1.0},), **ray):
        cfg = validate({**tiny_config, "launch": {"backend": "ray", "ray": ray}})
        nodes = [dict(n) for n in nodes]
        totals = {k: sum(n.get(k, 0) for n in nodes) for n in nodes for k in n}
        return unavailable(cfg, use_gpu, nodes, totals)

    assert why() is None and why(resources_per_worker={"CPU": 1}) is None
    assert why(use_gpu=True) == ("launch.ray.use_gpu=true asks for GPU: 1 per worker, 2 for the 2 workers, but the "
                                 "Ray cluster has no GPU (it has CPU: 2, memory: 4.0 GiB): Ray would wait for it "
                                 "forever")
    assert why(resources_per_worker={"foo": 1}).startswith(
        "launch.ray.resources_per_worker asks for foo: 1 per worker, 2 for the 2 workers, but the Ray cluster has no foo")
    assert why(use_gpu=True, resources_per_worker={"GPU": 1},
               nodes=[{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}]) is None
    assert why(num_workers=3).startswith("launch.ray.num_workers=3 asks for CPU: 1 per worker, 3 for the 3 workers, "
                                         "but the Ray cluster has CPU: 2")
    assert why(resources_per_worker={"CPU": 1}, nodes=[]).startswith("launch.ray.resources_per_worker asks for CPU: 1")
    # Enough in all, but a worker's share is on no single node.
    assert why(num_workers=1, resources_per_worker={"CPU": 3}, nodes=[{"CPU": 2}, {"CPU": 2}]) == (
        "launch.ray.resources_per_worker asks for CPU: 3 per worker, and no node of the Ray cluster holds that much "
        "(its nodes: CPU: 2; CPU: 2): Ray would wait for one forever")


def test_an_address_nothing_answers_at():
    """ray.init retried an address with no cluster for minutes (a warning every 5 s): one line at once instead."""
    from longtune.launch.ray_checks import unreachable

    assert unreachable("127.0.0.1:1").startswith("launch.ray.address=127.0.0.1:1: no Ray cluster answers there (")
    assert unreachable("auto") is None


def test_which_checkpoint_a_group_continues_from(tiny_config, tmp_path, capsys):
    """Issue 27: the driver killed after a checkpoint was complete in the run folder but before Ray copied it; the
    same command again continues from the run folder's newest complete checkpoint (it refused the run folder:
    "already holds checkpoints of an earlier run"). Reproduced by hand: SIGKILL to the driver's process group the
    moment step_2/COMPLETE appeared left Ray's storage with no checkpoint."""
    from longtune.launch.ray_checks import resume_choice, same_ray_run, step_of
    from longtune.launch.ray_launch import _resume_point
    from longtune.trainer.config import validate
    from longtune.trainer.inputs import COMPLETE
    from longtune.trainer.ranks import Ranks

    # rank 0 of a re-run: the run folder's step_4 is complete (step_6 is not), Ray has step_2 or nothing
    run = tmp_path / "run"
    for step in (2, 4, 6):
        (run / f"step_{step}").mkdir(parents=True)
    for step in (2, 4):
        (run / f"step_{step}" / COMPLETE).write_text("")
    cfg = validate(tiny_config)

    class RayCheckpoint:  # Ray's older copy: never opened when the run folder's is newer
        path = str(tmp_path / "storage" / "run" / "step_2")

        def as_directory(self):
            raise AssertionError("Ray's older checkpoint was copied")

    assert _resume_point(cfg, Ranks(), None, 4, True) == str(run / "step_4")
    assert _resume_point(cfg, Ranks(), RayCheckpoint(), 4, True) == str(run / "step_4")
    assert _resume_point(cfg, Ranks(), None, 4, False) is None  # another run's checkpoints: run.resume decides
    assert capsys.readouterr().out.splitlines() == [
        f"resuming from the run folder's newest complete checkpoint {run / 'step_4'} (Ray has no checkpoint of this run)",
        f"resuming from the run folder's newest complete checkpoint {run / 'step_4'} (Ray's latest is step 2)"]

    # (Ray's latest, the run folder's newest complete, the run folder's newest at launch, written by this Ray run)
    assert resume_choice(None, 4, 4, True) == "folder"  # a re-run: Ray never had a copy
    assert resume_choice(2, 4, 4, True) == "folder"  # a re-run: Ray has an older one
    assert resume_choice(4, 4, 4, True) == "ray"
    assert resume_choice(6, 4, 4, True) == "ray"
    assert resume_choice(None, 2, None, False) == "folder"  # a restart: written by this launch's first attempt
    assert resume_choice(2, 6, 4, False) == "folder"  # ... newer than anything at launch
    assert resume_choice(2, 4, 4, False) == "ray"  # the run folder's was there before this launch
    assert resume_choice(None, 4, 4, False) == "keep"  # another run's: the trainer refuses or uses run.resume
    assert resume_choice(None, None, None, False) == "keep"
    assert step_of("/s/story/step_12/") == 12 and step_of("/s/story/checkpoint_2024") is None

    saved = {"run": {"output_dir": "/r/run"}, "launch": {"backend": "ray", "ray": {"storage_path": None, "name": None}}}
    assert same_ray_run(saved, "/r/run/ray", "run")
    assert not same_ray_run(saved, "/r/run/ray", "other") and not same_ray_run(saved, "/elsewhere", "run")
    assert not same_ray_run({**saved, "launch": {"backend": "local", "ray": {}}}, "/r/run/ray", "run")
    assert not same_ray_run(None, "/r/run/ray", "run")


@pytest.mark.slow
def test_refused_before_workers_and_config_errors_not_retried(tiny_config, tmp_path, ray_address):
    """On the shared cluster, through the CLI: (1) a resource no node has is refused before a worker starts (Ray
    Train waited for it forever, a WorkerGroupStartupTimeoutError a minute); (2) a ConfigError on a worker (the
    run folder held by another process) with max_failures=-1 ends the run at once (it was restarted forever),
    and (3) the user reads one line, not the workers' tracebacks."""
    me = psutil.Process()
    tiny_config["run"]["device"] = "cpu"
    config = write_yaml(tmp_path / "config.yaml", tiny_config)
    run = tmp_path / "run"
    joined = ["launch.backend=ray", f"launch.ray.address={ray_address}", f"run.output_dir={run}"]

    start = time.monotonic()
    out = run_cli("train", config, *joined, "launch.ray.resources_per_worker={foo: 1}", timeout=120)
    refused_s = time.monotonic() - start
    assert out.returncode == 2, out.stderr[-3000:]
    assert re.fullmatch(r"error: launch.ray.resources_per_worker asks for foo: 1 per worker, 2 for the 2 workers, but "
                        r"the Ray cluster has no foo \(it has CPU: 2, .*\): Ray would wait for it forever\n",
                        out.stderr), out.stderr
    assert "ray:" not in out.stdout and not _train_workers(me)  # nothing was started

    from longtune.trainer.inputs import RunLock

    run.mkdir(exist_ok=True)  # (check() made it already)
    lock = RunLock(run)
    lock.acquire()
    start = time.monotonic()
    try:
        out = run_cli("train", config, *joined, "launch.ray.max_failures=-1", timeout=240, env=FAST_POLL)
    finally:
        lock.release()
    failed_s = time.monotonic() - start
    assert out.returncode == 2, out.stderr[-3000:]
    assert re.fullmatch(rf"error: the Ray run failed: rank 0: run.output_dir {run} is in use by pid {os.getpid()} .*"
                        r"pick another run.output_dir\n", out.stderr), out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    deadline = time.monotonic() + 30
    while _train_workers(me) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _train_workers(me), "the workers outlived the run"
    print(f"refused in {refused_s:.1f} s, ConfigError on a worker ended the run in {failed_s:.1f} s")


def test_without_ray_the_error_says_how_to_install(monkeypatch, tiny_config):
    from longtune.launch.ray_launch import run_on_ray
    from longtune.trainer.config import validate
    from longtune.trainer.errors import ConfigError

    cfg = validate({**tiny_config, "launch": {"backend": "ray", "ray": {"address": "auto"}}})
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"launch.backend=ray needs ray: pip install 'ray\[train\]'"):
        run_on_ray(cfg)
