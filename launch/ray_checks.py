"""What a Ray launch (launch/ray_launch.py) is refused for before any worker starts, and which checkpoint a
(re)started worker group continues from.

Nothing here imports Ray or torch: the config checks answer in the CLI's first second, and the decisions are
plain functions of what the driver and rank 0 saw, tested without a cluster.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Mapping, Optional

from longtune.trainer.errors import ConfigError

_HOST = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.\-_]*)"
_HOST_PORT = re.compile(rf"^{_HOST}:(\d{{1,5}})$")
_CLIENT = re.compile(rf"^ray://{_HOST}(:(\d{{1,5}}))?$")
# Ray's byte-valued resources, shown in GiB.
_BYTES = ("memory", "object_store_memory")


# --- the config, before Ray is imported -------------------------------------------------------------------


def check_launch(cfg) -> None:
    """The launch.ray keys that can be judged from the config alone, and the world size they give the trainer.
    ConfigError naming the key; nothing is started or written."""
    r = cfg.launch.ray
    check_address(r.address)
    if r.name is not None:
        check_name(r.name)
    for key, amount in (r.resources_per_worker or {}).items():
        if not math.isfinite(amount) or amount < 0:
            raise ConfigError(f"launch.ray.resources_per_worker.{key}={amount:g}: an amount of a resource is a "
                              "number of at least 0")
    gpus = (r.resources_per_worker or {}).get("GPU", 0)
    if r.use_gpu is False and gpus > 0:
        raise ConfigError(f"launch.ray.resources_per_worker asks for GPU: {gpus:g} per worker, but "
                          "launch.ray.use_gpu=false: set launch.ray.use_gpu=true, or drop GPU")
    if cfg.run.device == "cpu" and (r.use_gpu or gpus > 0):
        asked = "launch.ray.use_gpu=true" if r.use_gpu else f"launch.ray.resources_per_worker GPU: {gpus:g}"
        raise ConfigError(f"{asked} gives each worker a GPU, but run.device=cpu trains on the CPU: drop one of them")
    if r.use_gpu and "GPU" in (r.resources_per_worker or {}) and gpus == 0:
        raise ConfigError("launch.ray.use_gpu=true, but launch.ray.resources_per_worker gives each worker GPU: 0: "
                          "ask for a GPU count, or set launch.ray.use_gpu=false")
    n, strategy, sp = r.num_workers, cfg.parallel.strategy, cfg.parallel.sequence_parallel
    if strategy == "single" and n > 1:
        raise ConfigError(f"parallel.strategy=single runs one process, but launch.ray.num_workers={n}: set "
                          "parallel.strategy to ddp, fsdp2 or deepspeed (or auto), or launch.ray.num_workers=1")
    if n % sp:
        raise ConfigError(f"parallel.sequence_parallel={sp} does not divide launch.ray.num_workers={n}: give a "
                          f"multiple of {sp} (world = data parallel x sequence parallel)")


def check_address(address: Optional[str]) -> None:
    if address is None or address == "auto" or _port_ok(_HOST_PORT.match(address), 2) \
            or _port_ok(_CLIENT.match(address), 3):
        return
    raise ConfigError(f"launch.ray.address={address} is not a Ray cluster address: give auto (the cluster `ray start` "
                      "made on this machine), HOST:PORT (the head's GCS port, 6379 unless changed) or ray://HOST:PORT "
                      "(Ray Client, 10001), or leave it null for a local cluster on 127.0.0.1")


def unreachable(address: str, timeout_s: float = 5.0) -> Optional[str]:
    """Why nothing answers at a HOST:PORT or ray://HOST[:PORT] address (None when something does): ray.init would
    retry it for minutes, a warning every few seconds."""
    m = _HOST_PORT.match(address) or _CLIENT.match(address)
    if m is None:  # auto: Ray finds the address itself, and says so at once when there is none
        return None
    host = m.group(1).strip("[]")
    port = int(m.group(2) if m.re is _HOST_PORT else (m.group(3) or 10001))
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return (f"launch.ray.address={address}: no Ray cluster answers there ({e.strerror or e}); start one "
                "(`ray start --head`), or leave launch.ray.address null for a local cluster")
    return None


def _port_ok(m: Optional[re.Match], group: int) -> bool:
    return m is not None and (m.group(group) is None or 0 < int(m.group(group)) < 65536)


def check_name(name: str) -> None:
    """A Ray run's name is one folder inside storage_path: no separator, no `..`, nothing that leaves it."""
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"launch.ray.name={name!r} is not a name: Ray keeps the run in storage_path/NAME, so it "
                          "is one folder name (no /, \\ or ..)")


def check_storage(storage: str, name: str) -> None:
    """A local storage_path (after ~ and relative paths are resolved): a folder, or one that can be made, that this
    process can write in; a storage_path/NAME that exists is a folder. URIs (s3://...) are Ray's to judge."""
    key = f"launch.ray.storage_path {storage}"
    path = Path(storage)
    for p in [path / name, path, *path.parents]:
        if not os.path.lexists(p):
            continue
        if not p.is_dir():
            where = f"{key} is a file" if p == path else f"{key}: {p} is a file"
            raise ConfigError(f"{where}; give a folder (Ray keeps the run's checkpoints in storage_path/NAME)")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: cannot write in {p} (read-only or not ours); give a folder this user can write")
        return


# --- the cluster, once joined or started ------------------------------------------------------------------


def per_worker(resources: Mapping[str, float], use_gpu: bool) -> dict[str, float]:
    """What Ray Train reserves for each worker (its ScalingConfig's rule): the resources given, zeros dropped;
    none given: CPU 1, or GPU 1 with use_gpu; use_gpu adds GPU 1 when GPU is not given."""
    out = {k: float(v) for k, v in resources.items() if v != 0} if resources else {"GPU" if use_gpu else "CPU": 1.0}
    if use_gpu:
        out.setdefault("GPU", 1.0)
    return out


def unavailable(cfg, use_gpu: bool, nodes: list[Mapping[str, float]], totals: Mapping[str, float]) -> Optional[str]:
    """Why the cluster can never give the workers what they ask (None when it can): Ray would wait for it forever.
    `nodes`: each node's resources (or node type's, on a cluster that scales); `totals`: what all of them hold."""
    r = cfg.launch.ray
    asked, n = per_worker(r.resources_per_worker, use_gpu), r.num_workers

    def source(key: str) -> str:
        if key in (r.resources_per_worker or {}):
            return "launch.ray.resources_per_worker"
        return "launch.ray.use_gpu=true" if key == "GPU" else f"launch.ray.num_workers={n}"

    has = f"(it has {_amounts(totals) or 'nothing'}): Ray would wait for it forever"
    for key in sorted(asked):
        if asked[key] * n > totals.get(key, 0) + 1e-9:
            what = f"{key}: {_amount(key, asked[key])} per worker"
            if n > 1:
                what += f", {_amount(key, asked[key] * n)} for the {n} workers"
            held = f"{key}: {_amount(key, totals[key])}" if totals.get(key) else f"no {key}"
            return f"{source(key)} asks for {what}, but the Ray cluster has {held} {has}"
    if not any(all(node.get(k, 0) + 1e-9 >= v for k, v in asked.items()) for node in nodes):
        keys = sorted({source(k) for k in asked})
        return (f"{' and '.join(keys)} ask{'s' if len(keys) == 1 else ''} for {_amounts(asked)} per worker, and no node of the Ray cluster holds "
                f"that much (its nodes: {'; '.join(_amounts(node) for node in nodes) or 'none'}): Ray would wait "
                "for one forever")
    return None


def _amounts(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{k}: {_amount(k, v)}" for k, v in sorted(resources.items())
                     if not k.startswith(("node:", "accelerator_type:")))


def _amount(key: str, value: float) -> str:
    if key in _BYTES:
        return f"{value / 2**30:.1f} GiB"
    return f"{value:g}"


# --- on a (re)started worker group ------------------------------------------------------------------------


def resume_choice(ray_step: Optional[int], folder_step: Optional[int], launch_step: Optional[int],
                  folder_is_this_run: bool) -> str:
    """Which checkpoint a worker group continues from: "ray" (Ray's latest), "folder" (the run folder's newest
    complete one), or "keep" (run.resume as configured).

    The run folder's checkpoint counts when it is this Ray run's own: the run folder says it was written by this
    run (the same storage_path and name: a re-run of the same command), or it appeared after this launch (only
    this launch holds the run folder's lock). It is taken when Ray has none, or an older one: the group (or the
    driver) died after a checkpoint was complete but before Ray had its copy."""
    ours = folder_step is not None and (folder_is_this_run or launch_step is None or folder_step > launch_step)
    if ours and (ray_step is None or folder_step > ray_step):
        return "folder"
    return "ray" if ray_step is not None else "keep"


def newest_complete(output_dir: Path) -> Optional[Path]:
    """The run folder's newest complete checkpoint (quietly: the trainer warns of incomplete ones)."""
    from longtune.trainer.inputs import is_complete, list_checkpoints

    return next((path for _, path in reversed(list_checkpoints(output_dir)) if is_complete(path)), None)


def step_of(path: str) -> Optional[int]:
    """N of a checkpoint folder named step_N (Ray's copies are named so: checkpoint_dir_name), else None."""
    m = re.fullmatch(r"step_(\d+)", Path(str(path).rstrip("/")).name)
    return int(m.group(1)) if m else None


def written_by(output_dir: Path, storage: str, name: str) -> bool:
    """The run folder's config.resolved.yaml names the Ray run `storage`/`name`: its checkpoints are that run's."""
    import yaml

    try:
        saved = yaml.safe_load((Path(output_dir) / "config.resolved.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return same_ray_run(saved if isinstance(saved, dict) else None, storage, name)


def same_ray_run(saved: Optional[Mapping], storage: str, name: str) -> bool:
    """The run folder's config.resolved.yaml (`saved`, parsed) was written by the Ray run `storage`/`name`."""
    try:
        launch = saved["launch"]
        r = launch["ray"]
        if launch["backend"] != "ray":
            return False
        output_dir = Path(saved["run"]["output_dir"])
        return (resolve_storage(r.get("storage_path"), output_dir), r.get("name") or output_dir.name) == (storage, name)
    except (KeyError, TypeError, AttributeError):
        return False


def resolve_storage(storage_path: Optional[str], output_dir: Path) -> str:
    """launch.ray.storage_path as Ray gets it: absolute for a local path (the workers run in Ray's folders),
    a URI (s3://, gs://...) as given; null: RUN/ray."""
    storage = storage_path or str(Path(output_dir) / "ray")
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())
