"""`launch.backend: ray`: longtune's own training function on Ray Train workers (`TorchTrainer`, Train V2).

Ray starts the workers (on this machine or a cluster), sets up their process group and restarts the group after
a lost worker (`launch.ray.max_failures`). Each worker runs `trainer.train.train` as one rank, exactly as under
torchrun; longtune still writes its own step_N checkpoints into run.output_dir, and after each complete one every
rank reports it to Ray (rank 0 with the folder, which Ray copies to `launch.ray.storage_path`). A restarted group,
or a re-run with the same `launch.ray.name` and `storage_path`, gets Ray's latest checkpoint back and continues
from it: Ray's copy says where to resume, and is copied back into the run folder when that lacks it. The run
folder's own newest complete checkpoint is taken instead when it is newer (or Ray has none) and this run's: a
group, or the driver, that dies after a checkpoint is complete but before Ray has its copy loses nothing
(launch/ray_checks.resume_choice).

What cannot work is refused before a worker starts, in one line: a malformed launch.ray key (launch/ray_checks),
and resources the cluster does not have (Ray would wait for them forever). A ConfigError on any rank ends the run
at once, whatever launch.ray.max_failures says: only faults (a lost worker, a crash) are retried. The workers'
tracebacks stay in Ray's logs unless --debug.

Ray is imported only here, inside run_on_ray: the CLI answers --help and config errors without it.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from longtune.trainer.errors import ConfigError, RunError

# The driver's environment a worker on a cluster we join does not inherit (a local cluster's workers do):
# the Triton interpreter must be on before triton is imported.
PROPAGATED_ENV = ("TRITON_INTERPRET", "TOKENIZERS_PARALLELISM")
MAX_ERROR_CHARS = 400


def run_on_ray(cfg, debug: Optional[bool] = None) -> int:
    """Run `cfg` on Ray Train workers; 0 when the run finished. A failed run raises RunError (ConfigError when a
    worker rejected the config) with the worker's own message. `debug` (None: `--debug` on the command line):
    the workers print their tracebacks too."""
    import sys

    from longtune.launch.ray_checks import (check_launch, check_storage, newest_complete, resolve_storage, step_of,
                                            unreachable, written_by)

    if debug is None:
        debug = "--debug" in sys.argv[1:]
    check_launch(cfg)  # before Ray is imported: nothing starts for a config that cannot work
    r = cfg.launch.ray
    # Absolute before it travels: the workers run in Ray's session folders, not in this directory.
    output_dir = Path(cfg.run.output_dir).expanduser().resolve()
    cfg.run.output_dir = str(output_dir)
    storage = resolve_storage(r.storage_path, output_dir)
    name = r.name or output_dir.name
    if "://" not in storage:
        check_storage(storage, name)
    try:
        import ray
        from ray.train import (CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig,
                               TrainingFailedError)
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError:
        raise ConfigError("launch.backend=ray needs ray: pip install 'ray[train]'") from None
    from longtune.trainer.config import dump_config

    if "://" in storage:
        _check_storage_uri(storage)
    # The run folder records the Ray run that writes it (config.resolved.yaml): a re-run knows its checkpoints.
    r.storage_path, r.name = storage, name
    use_gpu = r.use_gpu
    if use_gpu is None:
        from longtune.trainer.ranks import device_type

        try:
            use_gpu = (r.resources_per_worker or {}).get("GPU", 0) > 0 or device_type(cfg.run.device) == "cuda"
        except ValueError as e:
            raise ConfigError(str(e)) from None
    backend = "nccl" if use_gpu else "gloo"
    at_launch = newest_complete(output_dir)

    if r.address:
        why = unreachable(r.address)
        if why:
            raise RunError(why)
        env = {k: os.environ[k] for k in PROPAGATED_ENV if k in os.environ}
        try:
            _ray_init(ray, address=r.address, **({"runtime_env": {"env_vars": env}} if env else {}))
        except ConnectionError as e:  # auto, and no cluster on this machine
            raise RunError(f"launch.ray.address={r.address}: {str(e).strip().splitlines()[0]}") from None
        where = f"the Ray cluster at {r.address}"
    else:
        # Our own machine: give Ray at least the CPUs the workers ask for (like torchrun --nproc N on fewer cores),
        # rather than a run that waits for resources forever.
        per_worker = (r.resources_per_worker or {}).get("CPU", 1)
        start_local_cluster(max(os.cpu_count() or 1, math.ceil(r.num_workers * per_worker)))
        where = f"a local Ray cluster at {ray.get_runtime_context().gcs_address}"
    try:
        _check_cluster(ray, cfg, use_gpu)
        trainer = _trainer_class(TorchTrainer)(
            _worker,
            train_loop_config={
                "config_yaml": dump_config(cfg),
                "cwd": os.getcwd(),  # relative paths in the config (model, data) mean what they mean here
                # the run folder's newest complete checkpoint at launch (a newer one is this run's own), and
                # whether the run folder was written by this Ray run (a re-run of the same command)
                "launch_step": None if at_launch is None else step_of(str(at_launch)),
                "folder_is_this_run": written_by(output_dir, storage, name),
                "debug": debug,
            },
            torch_config=TorchConfig(backend=backend, timeout_s=int(math.ceil(cfg.parallel.timeout_s))),
            scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=use_gpu,
                                         resources_per_worker=dict(r.resources_per_worker) or None),
            run_config=RunConfig(
                name=name, storage_path=storage,
                failure_config=FailureConfig(max_failures=r.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
                logging_config=LoggingConfig(log_level="WARNING"),  # a restart after a failure is a warning
            ),
        )
        print(f"ray: {r.num_workers} worker(s) ({'GPU' if use_gpu else 'CPU'}, {backend}) on {where} | run {name} | "
              f"storage {storage} | max_failures {r.max_failures}", flush=True)
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            raise _failure(e) from None
        except ray.exceptions.RayError as e:  # e.g. the controller could not start (its storage)
            raise RunError(f"the Ray run failed: {_one_line(_cause(e))}") from None
        if getattr(result, "error", None) is not None:
            raise _failure(result.error)
    finally:
        ray.shutdown()  # a local cluster stops with it; a joined one only loses this driver
    done = result.return_value or {}
    loss = done.get("last_loss")
    summary = f"done: step {done.get('step', '?')}, last loss {'None' if loss is None else f'{loss:.4g}'}"
    summary += "".join(f", {k} {v:.4g}" for k, v in (done.get("eval") or {}).items())
    print(f"{summary}; run folder {output_dir}; Ray run {result.path}")
    return 0


def _check_storage_uri(storage: str) -> None:
    """A storage URI Ray's filesystem layer (pyarrow) cannot open is refused here, not in Ray's controller."""
    try:
        import pyarrow.fs

        pyarrow.fs.FileSystem.from_uri(storage)
    except ImportError:
        return
    except Exception as e:  # noqa: BLE001 -- pyarrow's errors (ArrowInvalid, OSError) say what is wrong
        text = str(e).strip().splitlines()
        raise ConfigError(f"launch.ray.storage_path {storage}: {text[0] if text else type(e).__name__}") from None


def _check_cluster(ray, cfg, use_gpu: bool) -> None:
    """Refuse resources the cluster cannot give, before a worker is asked for: Ray Train would wait for them
    forever (a WorkerGroupStartupTimeoutError a minute, retried without end)."""
    from longtune.launch.ray_checks import unavailable

    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    totals = {k: float(v) for k, v in ray.cluster_resources().items()}
    try:  # a cluster that scales: what its node types can add
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 -- another Ray's internals: judge by the nodes there are
        config = None
    for group in getattr(config, "node_group_configs", None) or []:
        if group.max_count == 0:
            continue
        resources = {k: float(v) for k, v in group.resources.items()}
        nodes.append(resources)
        for k, v in resources.items():
            totals[k] = totals.get(k, 0.0) + (v * group.max_count if group.max_count > 0 else math.inf)
    why = unavailable(cfg, use_gpu, nodes, totals)
    if why:
        raise ConfigError(why)


def _trainer_class(torch_trainer):
    """TorchTrainer whose failure policy ends the run on a ConfigError (see ConfigErrorsEndTheRun)."""

    class Trainer(torch_trainer):
        def _initialize_and_run_controller(self, **kwargs):
            if "failure_policy" in kwargs:
                kwargs["failure_policy"] = ConfigErrorsEndTheRun(kwargs["failure_policy"])
            return super()._initialize_and_run_controller(**kwargs)

    return Trainer


class ConfigErrorsEndTheRun:
    """Ray Train's failure policy, but a worker group in which a rank raised ConfigError is not restarted: the same
    config fails the same way again (launch.ray.max_failures=-1 would retry it forever). Faults, a lost worker or
    a crash, go to Ray's own policy (max_failures). Runs in Ray's controller actor."""

    def __init__(self, policy):
        self.policy = policy
        self.failure_config = getattr(policy, "failure_config", None)

    def make_decision(self, training_failed_error):
        failures = getattr(training_failed_error, "worker_failures", None) or {}
        if any(isinstance(_cause(e), ConfigError) for e in failures.values()):
            from ray.train.v2._internal.execution.failure_handling import FailureDecision

            return FailureDecision.RAISE
        return self.policy.make_decision(training_failed_error)


def start_local_cluster(num_cpus: int) -> None:
    """A Ray cluster of this machine alone, owned by this process (ray.shutdown stops it): every service
    listens on 127.0.0.1 only, and there is no dashboard."""
    _loopback_only()
    # Ray Train's preemption watcher is for cloud nodes taken back; a machine's own cluster has none. Its actor
    # makes the controller log an error line ("PreemptionWatcher ... max_restarts > 0") on every run.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    import ray

    # address="local": a new cluster even when `ray start` left one running here (address=None would join it)
    _ray_init(ray, address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus)


def _loopback_only() -> None:
    # `_node_ip_address="127.0.0.1"` alone is not enough: Ray swaps a loopback address for the machine's
    # reachable one, and its GCS, raylet and workers then listen on every interface. Ray's single-machine mode
    # (the default on macOS and Windows) keeps them on 127.0.0.1. The variable reaches the processes ray.init
    # starts; the constant is what this process reads (ray reads the variable once, at import).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def _ray_init(ray, **kwargs) -> None:
    import logging

    # The run's own lines are what the user reads. Ray's INFO lines on the driver are noise next to them, and
    # without a dashboard (no state API) Ray Train's placement group cleaner warns every few seconds that it
    # cannot query the controller: Ray's loggers on the workers log errors only (Ray Train's own: warnings, in
    # RunConfig). Deduplication would merge lines that differ only in numbers (rank 0's and rank 1's): off.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray Train's print patch sends every print() to a logger as well, past prefix_output: ranks other than 0
    # would print their progress after all (Ray passes this variable on to the workers).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray.init(logging_level=logging.WARNING, logging_config=ray.LoggingConfig(log_level="ERROR"), **kwargs)


def _failure(error: BaseException) -> Exception:
    """One line for the user: the failing workers' own exceptions, not Ray's traceback around them; ranks that
    failed the same way share one mention. A ConfigError on any rank is the run's error (exit 2): the other ranks'
    errors (a collective whose peer left) follow from it."""
    failures = getattr(error, "worker_failures", None) or {}
    if not failures:
        cause = getattr(error, "controller_failure", None) or error
        return RunError(f"the Ray run failed: {_one_line(cause)}")
    causes = {rank: _cause(e) for rank, e in sorted(failures.items())}
    refused = {rank: e for rank, e in causes.items() if isinstance(e, ConfigError)}
    ranks_of: dict[str, list[int]] = {}
    for rank, e in (refused or causes).items():
        ranks_of.setdefault(_one_line(e), []).append(rank)
    text = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {line}"
                     for line, rs in ranks_of.items())
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS].rstrip() + " ..."
    # A config the workers refuse is the user's to fix (exit 2), like the same error in a local run.
    return (ConfigError if refused else RunError)(f"the Ray run failed: {text}")


def _cause(e: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (RayTaskError keeps it as .cause)."""
    seen = 0
    while getattr(e, "cause", None) is not None and seen < 8:
        e, seen = e.cause, seen + 1
    return e


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    # A RayTaskError's text is a traceback; its last line is the exception itself.
    text = lines[-1] if lines and lines[0].startswith(("ray::", "Traceback")) else (lines[0] if lines else "")
    if isinstance(e, (ConfigError, RunError)):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --- on each worker ---------------------------------------------------------------------------------


def _worker(loop_config: dict[str, Any]):
    """One rank: the config re-validated here, Ray's checkpoint (if any) as run.resume, then train()."""
    from longtune.launch.isolation import keep_checkout_off_sys_path

    keep_checkout_off_sys_path()  # Ray put the driver's folder first on this worker's sys.path
    _quiet_worker_logs(loop_config["debug"])
    import ray.train
    import yaml

    from longtune.launch.distributed import prefix_output
    from longtune.trainer.config import validate
    from longtune.trainer.ranks import Ranks

    if os.path.isdir(loop_config["cwd"]):  # the same machine, or a shared filesystem
        os.chdir(loop_config["cwd"])
    cfg = validate(yaml.safe_load(loop_config["config_yaml"]))
    ranks = Ranks.current()  # Ray set up the process group before calling us
    prefix_output(ranks.rank, ranks.world)
    resume = _resume_point(cfg, ranks, ray.train.get_checkpoint(), loop_config["launch_step"],
                           loop_config["folder_is_this_run"])
    if resume is not None:
        cfg.run.resume = resume

    from longtune.trainer.train import train

    def report(path: Path, step: int, metrics: dict) -> None:
        # A barrier: every rank reports each checkpoint; rank 0's folder is the one Ray copies to storage.
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if ranks.main else None
        ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint,
                         checkpoint_dir_name=f"step_{step}")

    result = train(cfg, on_checkpoint=report)
    return {"step": result.step, "last_loss": result.last_loss, "eval": result.eval}  # rank 0's is Result.return_value


# Ray Train's logger on a worker that logs the traceback of an exception in the training function ("Error in
# training function:", 30-40 lines per rank before the driver's one-line error, which says the same).
TRACEBACK_LOGGER = "ray.train.v2._internal.util"


def _quiet_worker_logs(debug: bool) -> None:
    """Ray Train's lines on a worker that repeat what the user reads once: an INFO line per `ray.train.report`
    (logger named after its file; our progress line says it), and, unless --debug, a failing rank's traceback."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: the lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    if not debug:
        logging.getLogger(TRACEBACK_LOGGER).setLevel(logging.CRITICAL)


def _resume_point(cfg, ranks, checkpoint, launch_step: Optional[int], folder_is_this_run: bool) -> Optional[str]:
    """What run.resume becomes on this (re)started worker group: Ray's latest checkpoint as a step_N folder of
    the run folder, or the run folder's newest complete checkpoint when that is newer and this run's own
    (ray_checks.resume_choice), or None to keep the configured run.resume. Rank 0 decides (and copies); the
    others learn."""
    from longtune.launch.ray_checks import newest_complete, resume_choice, step_of

    output_dir = Path(cfg.run.output_dir)
    decision: tuple[str, Optional[str]] = ("keep", None)
    if ranks.main:
        try:
            newest = newest_complete(output_dir)
            folder_step = None if newest is None else step_of(str(newest))
            ray_step = None if checkpoint is None else step_of(checkpoint.path)
            choice = resume_choice(ray_step, folder_step, launch_step, folder_is_this_run)
            if checkpoint is not None and ray_step is None:  # a checkpoint Ray names otherwise: Ray's word
                choice = "ray"
            if choice == "ray":
                with checkpoint.as_directory() as src:  # the storage folder itself when it is on this filesystem
                    path = _place(Path(src), output_dir)
                print(f"resuming from Ray's checkpoint {checkpoint.path} as {path}")
                decision = ("resume", str(path))
            elif choice == "folder":
                # Complete in the run folder, but Ray has no copy of it (or an older one): the group, or the
                # driver, died between writing it and Ray registering its report.
                than = "Ray has no checkpoint of this run" if ray_step is None else f"Ray's latest is step {ray_step}"
                print(f"resuming from the run folder's newest complete checkpoint {newest} ({than})")
                decision = ("resume", str(newest))
        except Exception as e:  # noqa: BLE001 -- every rank fails with rank 0's message instead of waiting for it
            decision = ("error", f"{type(e).__name__}: {e}" if not isinstance(e, (RunError, ConfigError)) else str(e))
    kind, value = ranks.from_main(decision)
    if kind == "error":
        raise RunError(value)
    return value


def _place(src: Path, output_dir: Path) -> Path:
    """Ray's checkpoint folder `src` (a longtune step_N) as RUN/step_N: that one when it is complete already,
    else a copy written like a checkpoint (a temporary folder, renamed, the COMPLETE marker last)."""
    import json

    from longtune.trainer.inputs import COMPLETE, is_complete, step_dir, temp_name

    if not is_complete(src):
        raise RunError(f"Ray's checkpoint {src} is not a complete longtune checkpoint (no {COMPLETE} marker)")
    try:
        step = json.loads((src / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"Ray's checkpoint {src} has no readable trainer_state.json: {e}") from None
    final = step_dir(output_dir, int(step))
    if is_complete(final):
        return final
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / temp_name(int(step))  # a name the run folder's stale-temporary cleanup knows
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(COMPLETE))
    if final.exists():  # an incomplete leftover
        shutil.rmtree(final)
    os.rename(tmp, final)
    with open(final / COMPLETE, "w") as f:
        f.flush()
        os.fsync(f.fileno())
    return final
