"""`launch.backend: ray`: longtune's own training function on Ray Train workers (`TorchTrainer`, Train V2).

Ray starts the workers (on this machine or a cluster), sets up their process group and restarts the group after
a lost worker (`launch.ray.max_failures`). Each worker runs `trainer.train.train` as one rank, exactly as under
torchrun; longtune still writes its own step_N checkpoints into run.output_dir, and after each complete one every
rank reports it to Ray (rank 0 with the folder, which Ray copies to `launch.ray.storage_path`). A restarted group,
or a re-run with the same `launch.ray.name` and `storage_path`, gets Ray's latest checkpoint back and continues
from it: Ray's copy says where to resume, and is copied back into the run folder when that lacks it. (One gap
is filled from the run folder: a group that dies after writing its first checkpoint but before Ray registered
its report continues from that checkpoint, instead of refusing a run folder that holds one.)

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


def run_on_ray(cfg) -> int:
    """Run `cfg` on Ray Train workers; 0 when the run finished. A failed run raises RunError (ConfigError when
    every failing worker rejected the config) with the worker's own message."""
    try:
        import ray
        from ray.train import (CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig,
                               TrainingFailedError)
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError:
        raise ConfigError("launch.backend=ray needs ray: pip install 'ray[train]'") from None
    from longtune.trainer.config import dump_config
    from longtune.trainer.inputs import latest_complete

    r = cfg.launch.ray
    # Absolute before it travels: the workers run in Ray's session folders, not in this directory.
    output_dir = Path(cfg.run.output_dir).expanduser().resolve()
    cfg.run.output_dir = str(output_dir)
    storage = r.storage_path or str(output_dir / "ray")
    if "://" not in storage:  # a local or shared-filesystem path (s3://, gs://... go as given)
        storage = str(Path(storage).expanduser().resolve())
    name = r.name or output_dir.name
    use_gpu = r.use_gpu
    if use_gpu is None:
        from longtune.trainer.ranks import device_type

        try:
            use_gpu = device_type(cfg.run.device) == "cuda"
        except ValueError as e:
            raise ConfigError(str(e)) from None
    backend = "nccl" if use_gpu else "gloo"

    if r.address:
        env = {k: os.environ[k] for k in PROPAGATED_ENV if k in os.environ}
        _ray_init(ray, address=r.address, **({"runtime_env": {"env_vars": env}} if env else {}))
        where = f"the Ray cluster at {r.address}"
    else:
        # Our own machine: give Ray at least the CPUs the workers ask for (like torchrun --nproc N on fewer cores),
        # rather than a run that waits for resources forever.
        per_worker = (r.resources_per_worker or {}).get("CPU", 1)
        start_local_cluster(max(os.cpu_count() or 1, math.ceil(r.num_workers * per_worker)))
        where = f"a local Ray cluster at {ray.get_runtime_context().gcs_address}"
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "config_yaml": dump_config(cfg),
                "cwd": os.getcwd(),  # relative paths in the config (model, data) mean what they mean here
                # no checkpoint in the run folder at launch: any that appears later is this run's own
                "fresh": cfg.run.resume is None and latest_complete(output_dir) is None,
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


def start_local_cluster(num_cpus: int) -> None:
    """A Ray cluster of this machine alone, owned by this process (ray.shutdown stops it): every service
    listens on 127.0.0.1 only, and there is no dashboard."""
    _loopback_only()
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
    """One line for the user: each failing worker's own exception, not Ray's traceback around it."""
    failures = getattr(error, "worker_failures", None) or {}
    if not failures:
        cause = getattr(error, "controller_failure", None) or error
        return RunError(f"the Ray run failed: {_one_line(cause)}")
    causes = {rank: _cause(e) for rank, e in sorted(failures.items())}
    text = "; ".join(f"rank {rank}: {_one_line(e)}" for rank, e in causes.items())
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS].rstrip() + " ..."
    # A config the workers refuse is the user's to fix (exit 2), like the same error in a local run.
    kind = ConfigError if all(isinstance(e, ConfigError) for e in causes.values()) else RunError
    return kind(f"the Ray run failed: {text}")


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
    _quiet_reports()
    resume = _resume_point(cfg, ranks, ray.train.get_checkpoint(), loop_config["fresh"])
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


def _quiet_reports() -> None:
    """Ray Train logs an INFO line per `ray.train.report` on every worker (logger named after its file): our
    own progress line says the same, so keep only its warnings."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: the lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _resume_point(cfg, ranks, checkpoint, fresh: bool) -> Optional[str]:
    """What run.resume becomes on this (re)started worker group: Ray's latest checkpoint as a step_N folder of
    the run folder, or None to keep the configured run.resume. Rank 0 decides (and copies); the others learn."""
    from longtune.trainer.inputs import latest_complete

    output_dir = Path(cfg.run.output_dir)
    decision: tuple[str, Optional[str]] = ("keep", None)
    if ranks.main:
        try:
            if checkpoint is not None:
                with checkpoint.as_directory() as src:  # the storage folder itself when it is on this filesystem
                    path = _place(Path(src), output_dir)
                print(f"resuming from Ray's checkpoint {checkpoint.path} as {path}")
                decision = ("resume", str(path))
            elif fresh and latest_complete(output_dir) is not None:
                # The group failed between writing a checkpoint and reporting its first: the checkpoint is this
                # run's own (the run folder held none at launch, and only this run holds its lock).
                print("the restarted group continues from the run folder's newest complete checkpoint, written by "
                      "its previous attempt before it could report one to Ray")
                decision = ("resume", "auto")
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
