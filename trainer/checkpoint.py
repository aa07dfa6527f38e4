"""Checkpoints that are either complete or ignored.

A checkpoint is written into a hidden temporary folder, renamed to `step_N`,
and only then marked with an empty `COMPLETE` file. Readers accept nothing
without the marker; pruning removes the marker first. Nothing here unpickles
arbitrary objects: weights are safetensors, everything else loads with
`torch.load(weights_only=True)` or is JSON/YAML.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from .errors import CheckpointError
from .inputs import (  # noqa: F401 (latest_complete: re-exported)
    COMPLETE, is_complete, latest_complete, list_checkpoints, remove_stale_temporaries, step_dir, temp_name,
)

MODEL_FILE = "model.safetensors"



@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    data: Optional[dict[str, int]] = None  # the loader's state_dict


# --- RNG ---------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(py_state), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- write ---------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    output_dir: Path,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config_yaml: str,
    keep_last: Optional[int] = None,
) -> Path:
    """Write step_N atomically; prune older ones only once the new one is complete.

    Temporary folders that dead writers left behind are removed first, and the write is refused, before a byte is
    written, when the disk cannot hold it."""
    output_dir = Path(output_dir)
    final = step_dir(output_dir, state.step)
    tmp = output_dir / temp_name(state.step)
    remove_stale_temporaries(output_dir)
    _check_room(output_dir, final, model, optimizer)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / MODEL_FILE))
        if hasattr(model, "config"):  # the architecture, so loading needs no GGUF parse
            model.config.to_json_file(tmp / "config.json")
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        _torch_save(rng_state(), tmp / "rng.pt")
        _write_text(tmp / "trainer_state.json", json.dumps(state.__dict__, indent=1))
        _write_text(tmp / "config.resolved.yaml", config_yaml)
        _fsync_dir(tmp)
        if final.exists():  # an incomplete leftover of an earlier, interrupted run
            _remove(final)
        os.rename(tmp, final)
        _write_text(final / COMPLETE, "")
        _fsync_dir(final)
        _fsync_dir(output_dir)
    except BaseException as e:  # torch.save reports ENOSPC as a RuntimeError; Ctrl-C must clean up too
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        raise CheckpointError(f"could not write checkpoint {final}: {_root_cause(e)}") from e
    if keep_last:
        prune(output_dir, keep_last)
    return final


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _check_room(output_dir: Path, final: Path, model: torch.nn.Module, optimizer) -> None:
    """Refuse a checkpoint the disk cannot hold, before writing anything. Older checkpoints do not count as free:
    they are pruned only once the new one is complete."""
    need = _tensor_bytes(model.state_dict()) + _tensor_bytes(optimizer.state_dict()) + (1 << 20)
    free = shutil.disk_usage(output_dir).free
    if need > free:
        raise CheckpointError(f"could not write checkpoint {final}: it needs {need / 1e9:.2f} GB and "
                              f"{free / 1e9:.2f} GB are free under {output_dir} (free some space, lower "
                              "checkpoint.keep_last, or move run.output_dir)")


def _root_cause(err: BaseException) -> str:
    """The OS error behind a library's wrapper exception, e.g. 'No space left on device'."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return str(err)


def _remove(path: Path) -> None:
    # The marker goes first, so a half-removed folder never looks complete.
    (path / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(path)


def prune(output_dir: Path, keep_last: int) -> None:
    complete = [(s, p) for s, p in list_checkpoints(output_dir) if is_complete(p)]
    if not complete:
        return
    cutoff = complete[-keep_last][0] if len(complete) >= keep_last else complete[0][0]
    for step, path in list_checkpoints(output_dir):
        if step < cutoff:
            _remove(path)


# --- read ----------------------------------------------------------------------------------


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} is unreadable: it holds objects other than tensors and plain data, and is not unpickled") from None


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> TrainState:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker); refusing to load it")
    try:
        missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False)
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        if optimizer is not None:
            optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
        if scheduler is not None:
            scheduler.load_state_dict(_torch_load(path / "scheduler.pt"))
        if restore_rng:
            set_rng_state(_torch_load(path / "rng.pt"))
        state = read_train_state(path / "trainer_state.json")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- OSError, safetensors' and torch's own errors on a damaged file
        raise CheckpointError(f"checkpoint {path} is unreadable: {_one_line(e)}") from e
    return state


def read_train_state(path: Path) -> TrainState:
    """trainer_state.json, checked: valid JSON of the right shape, or one line saying what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable: {_one_line(e)}") from None
    ints = ("step", "tokens_seen")
    if (not isinstance(data, dict) or set(data) - {*ints, "data"}
            or any(not isinstance(data.get(k), int) or isinstance(data.get(k), bool) or data[k] < 0 for k in ints)
            or not (data.get("data") is None or isinstance(data["data"], dict))):
        raise CheckpointError(f"{path} does not hold a trainer state (step and tokens_seen >= 0, data a mapping): "
                              f"{str(data)[:80]}")
    return TrainState(**data)


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
