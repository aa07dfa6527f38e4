"""Checkpoints that are either complete or ignored.

A checkpoint is written into a hidden temporary folder, renamed to `step_N`,
and only then marked with an empty `COMPLETE` file. Readers accept nothing
without the marker; pruning removes the marker first. Nothing here unpickles
arbitrary objects: weights are safetensors, everything else loads with
`torch.load(weights_only=True)` or is JSON/YAML.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .adapters import trainable_state
from .errors import CheckpointError, signal_behind, signals_received
from .inputs import (  # noqa: F401 (latest_complete: re-exported)
    COMPLETE, is_complete, latest_complete, list_checkpoints, remove_stale_temporaries, step_dir, temp_name,
)

MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"  # a model with frozen base weights (adapters): the parameters that train



@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    data: Optional[dict[str, int]] = None  # the loader's state_dict: the global data position, the same on every rank
    world_size: int = 1  # processes that trained up to here


# --- model and optimizer: the parts a parallel strategy writes its own way -----------------------------------


def checkpoint_format(path: Path) -> str:
    """How a checkpoint holds its weights and optimizer: torch (model.safetensors + optimizer.pt), dcp (torch
    distributed checkpoint, sharded per rank, reshardable) or deepspeed (ZeRO's own files)."""
    path = Path(path)
    if (path / DEEPSPEED_DIR).is_dir():
        return "deepspeed"
    if (path / DCP_DIR).is_dir():
        return "dcp"
    return "torch"


class TorchParts:
    """model.safetensors + optimizer.pt, written by rank 0 (single process, and DDP, whose ranks hold the same
    state). Loads a dcp checkpoint too (an FSDP2 run resumed on one process, or exported); a DeepSpeed one for
    its weights only (export)."""

    format = "torch"

    def __init__(self, model: torch.nn.Module, optimizer=None, main: bool = True, materialized=None):
        self.model, self.optimizer, self.main = model, optimizer, main
        # streamed weights are gathered into the model around a save or a load (MemoryRuntime.materialized)
        self.materialized = materialized or contextlib.nullcontext

    @property
    def trains_a_part(self) -> bool:
        """Frozen base weights (adapters): a checkpoint holds only the parameters that train; the base is rebuilt
        from model.* (trainer/adapters.py)."""
        return any(not p.requires_grad for p in self.model.parameters())

    def nbytes(self) -> int:
        if not self.main:
            return 0
        weights = _tensor_bytes(trainable_state(self.model) if self.trains_a_part else self.model.state_dict())
        return weights + (_tensor_bytes(self.optimizer.state_dict()) if self.optimizer else 0)

    def save(self, folder: Path) -> None:
        if self.main:
            optimizer_state = self.optimizer.state_dict()  # first: an offloaded optimizer finishes its updates
            with self.materialized():
                if self.trains_a_part:
                    save_file({k: v.contiguous() for k, v in trainable_state(self.model).items()},
                              str(folder / ADAPTER_FILE))
                else:
                    save_model(self.model, str(folder / MODEL_FILE))
            _torch_save(optimizer_state, folder / "optimizer.pt")

    def _load_trainable(self, folder: Path) -> None:
        if not (folder / ADAPTER_FILE).is_file():
            raise CheckpointError(f"checkpoint {folder} holds a whole model ({MODEL_FILE}) and this run trains adapters "
                                  "(adapter.kind): resume it without adapter.*, or start adapters from its export "
                                  "(longtune export, then model.path)")
        state = load_file(str(folder / ADAPTER_FILE))
        expected = set(trainable_state(self.model))
        if set(state) != expected:
            raise CheckpointError(f"checkpoint {folder} does not match this run's adapters: missing "
                                  f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]} "
                                  "(another adapter.rank, adapter.target_modules or adapter.modules_to_save?)")
        self.model.load_state_dict(state, strict=False)

    def load(self, folder: Path) -> None:
        kind = checkpoint_format(folder)
        if kind == "dcp":
            optimizer = self.optimizer if isinstance(self.optimizer, torch.optim.Optimizer) else None
            if self.optimizer is not None and optimizer is None:
                raise CheckpointError(f"checkpoint {folder} was written by FSDP2 (torch distributed checkpoint); its "
                                      "optimizer state loads into torch's AdamW on the GPU only (memory.optimizer=gpu)")
            return load_dcp(folder, self.model, optimizer)
        if kind == "deepspeed":
            if self.optimizer is not None:
                raise CheckpointError(f"checkpoint {folder} was written by DeepSpeed ZeRO: resume it with "
                                      "parallel.strategy=deepspeed (or export it: longtune export)")
            return load_deepspeed_weights(folder, self.model)
        if self.trains_a_part:
            self._load_trainable(folder)
            if self.optimizer is not None:
                self.optimizer.load_state_dict(_torch_load(folder / "optimizer.pt"))
            return
        if (folder / ADAPTER_FILE).is_file():
            raise CheckpointError(f"checkpoint {folder} holds adapters only: resume it with its adapter.* settings")
        with self.materialized():
            missing, unexpected = load_model(self.model, str(folder / MODEL_FILE), strict=False)
            if missing or unexpected:
                raise CheckpointError(f"checkpoint {folder} does not match the model: missing {sorted(missing)[:3]}, "
                                      f"unexpected {sorted(unexpected)[:3]}")
            if self.optimizer is not None:
                self.optimizer.load_state_dict(_torch_load(folder / "optimizer.pt"))


DCP_DIR, DEEPSPEED_DIR, DEEPSPEED_TAG = "dcp", "deepspeed", "zero"


@contextlib.contextmanager
def _dcp_errors():
    """torch.distributed.checkpoint reports any rank's failure (a missing or truncated file, a full disk) as a
    CheckpointException, a BaseException that passes every `except Exception`: the failure behind it, raised as
    itself, is what the caller reports (naming the checkpoint)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        failures = sorted(e.failures.items())
        if not failures:
            raise RuntimeError(_one_line(e)) from None
        rank, (cause, _) = failures[0]
        if isinstance(cause, Exception):
            raise cause from None
        raise RuntimeError(f"rank {rank}: {_one_line(cause)}") from None


def load_dcp(folder: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """A torch distributed checkpoint into this process's model (and optimizer), whatever the world size it was
    written with and this one runs with: DCP reshards by each tensor's global offsets."""
    _check_dcp(folder)
    with _dcp_errors(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process reading it: meant
        _load_dcp(folder, model, optimizer)


def _check_dcp(folder: Path) -> None:
    """The files a torch distributed checkpoint's metadata names are all there, whole: one line naming the file
    that is missing or cut short, before DCP fails on it with a traceback per rank in its log."""
    from torch.distributed.checkpoint import FileSystemReader

    root = folder / DCP_DIR
    if not (root / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {folder} is unreadable: {DCP_DIR}/.metadata is missing")
    try:
        metadata = FileSystemReader(str(root)).read_metadata()
    except Exception as e:  # noqa: BLE001 -- a truncated pickle, a file of something else
        raise CheckpointError(f"checkpoint {folder} is unreadable: {DCP_DIR}/.metadata is damaged ({_one_line(e)})") \
            from None
    ends: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = getattr(info, "relative_path", None)
        if name is not None:
            ends[name] = max(ends.get(name, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        path = root / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is unreadable: {DCP_DIR}/{name} is missing")
        if path.stat().st_size < end:
            raise CheckpointError(f"checkpoint {folder} is unreadable: {DCP_DIR}/{name} is truncated "
                                  f"({path.stat().st_size:,} of at least {end:,} bytes)")


def _dcp_options(model: torch.nn.Module):
    """Frozen base weights (adapters) are neither written nor read: the base is rebuilt from model.*, as for the
    other formats (TorchParts.trains_a_part). dcp.load still refuses a checkpoint that lacks a parameter that
    trains; only the load into the module is not strict, which would ask for the frozen ones."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def _load_dcp(folder: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    options = _dcp_options(model)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = {"model": get_model_state_dict(model, options=options)}
        dcp.load(state, checkpoint_id=str(folder / DCP_DIR))
        set_model_state_dict(model, state["model"], options=options)
        return
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)


def save_dcp(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the weights and the optimizer state (torch.distributed.checkpoint); with
    adapters, of the parameters that train only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_dcp_options(model))
    with _dcp_errors():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder / DCP_DIR))


def load_deepspeed_weights(folder: Path, model: torch.nn.Module) -> None:
    """The fp32 weights of a DeepSpeed ZeRO checkpoint, gathered from its shards in this one process."""
    # here, not at the top: importing it sets DS_ACCELERATOR on a machine without CUDA, and a run that reads no
    # DeepSpeed checkpoint leaves DeepSpeed's own accelerator detection (its CPU Adam and NVMe ops) alone
    from .deepspeed_files import fp32_state_dict

    state = fp32_state_dict(folder / DEEPSPEED_DIR, DEEPSPEED_TAG)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {folder} does not match the model: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier name (tied embeddings): ZeRO saves each tensor once."""
    seen, tied = set(), set()
    for name, t in model.state_dict(keep_vars=True).items():
        ptr = t.data_ptr()
        (tied.add(name) if ptr in seen else seen.add(ptr))
    return tied


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
    parts=None,
    ranks=None,
) -> Path:
    """Write step_N atomically; prune older ones only once the new one is complete.

    Every rank writes its part (`parts`: the strategy's weights and optimizer state; its RNG) into one temporary
    folder that rank 0 made; rank 0 writes the rest, renames the folder and writes the marker last. A failure on
    any rank is every rank's CheckpointError (no rank waits for a dead one). Temporary folders of dead writers
    are removed first, and the write is refused, before a byte is written, when the disk cannot hold it."""
    from .ranks import Ranks

    ranks = ranks or Ranks()
    parts = parts or TorchParts(model, optimizer)
    output_dir = Path(output_dir)
    final = step_dir(output_dir, state.step)
    tmp = output_dir / ranks.from_main(temp_name(state.step))

    def on_every_rank(work) -> None:
        error, mark = None, signals_received()
        try:
            work()
        except BaseException as e:  # torch.save reports ENOSPC as a RuntimeError; Ctrl-C must clean up too
            error = signal_behind(e, mark) or e  # an interrupt that a library turned into its own error is one
        if not ranks.all_ok(error is None):
            if ranks.main:
                shutil.rmtree(tmp, ignore_errors=True)
            if error is not None and (not isinstance(error, Exception) or isinstance(error, CheckpointError)):
                raise error
            cause = write_failure(error, output_dir, keep_last) if error is not None else \
                "another rank failed to write its part"
            raise CheckpointError(f"could not write checkpoint {final}: {cause}") from error

    need = ranks.sum_int(parts.nbytes())  # a collective: outside the steps that may fail on one rank

    def prepare() -> None:
        if ranks.main:
            remove_stale_temporaries(output_dir)
            _make_room(output_dir, final, need, keep_last)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

    def write_parts() -> None:
        parts.save(tmp)
        if ranks.world > 1 and not ranks.main:
            _torch_save(rng_state(), tmp / f"rng_rank{ranks.rank}.pt")

    renamed = False

    def finish() -> None:
        nonlocal renamed
        if not ranks.main:
            return
        if hasattr(model, "config"):  # the architecture, so loading needs no GGUF parse
            model.config.to_json_file(tmp / "config.json")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        _torch_save(rng_state(), tmp / "rng.pt")
        _write_text(tmp / "trainer_state.json", json.dumps({**state.__dict__, "world_size": ranks.world}, indent=1))
        _write_text(tmp / "config.resolved.yaml", config_yaml)
        for sub in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            _fsync_dir(sub)
        if final.exists():  # an incomplete leftover of an earlier, interrupted run
            _remove(final)
        os.rename(tmp, final)
        renamed = True
        _write_text(final / COMPLETE, "")
        _fsync_dir(final)
        _fsync_dir(output_dir)

    try:
        on_every_rank(prepare)
        on_every_rank(write_parts)
        on_every_rank(finish)
    except BaseException:  # a failure, or a signal between the steps: nothing half-written stays
        if ranks.main:
            shutil.rmtree(tmp, ignore_errors=True)
            if renamed and not is_complete(final):
                shutil.rmtree(final, ignore_errors=True)
        raise
    if keep_last and ranks.main:
        prune(output_dir, keep_last)
    ranks.barrier()  # nobody goes on (or reads the folder) before it is complete and pruned
    return final


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _make_room(output_dir: Path, final: Path, need: int, keep_last: Optional[int]) -> None:
    """Refuse a checkpoint the disk cannot hold, before writing anything. When the older checkpoints that keep_last
    prunes once this one is complete are what makes room, they are pruned first; the newest complete one always
    stays until the new one is complete (a failed write must leave something to resume from)."""
    need += 1 << 20
    free = shutil.disk_usage(output_dir).free
    if need <= free:
        return
    found = list_checkpoints(output_dir)
    complete = [p for _, p in found if is_complete(p) and p != final]
    junk = [p for _, p in found if not is_complete(p) and p != final]  # never loaded: interrupted renames
    sizes = {p: _folder_bytes(p) for p in [*junk, *complete]}

    def room_keeping(k: int) -> tuple[list[Path], int]:
        """What goes, and the free bytes after, when the newest k older checkpoints stay."""
        gone = [*junk, *complete[:max(len(complete) - k, 0)]]
        return gone, free + sum(sizes[p] for p in gone)

    keep = max((keep_last or len(complete) + 1) - 1, 1)  # what keep_last keeps besides the new one
    gone, after = room_keeping(keep)
    if after >= need:
        removed = []
        for p in gone:
            _remove(p)
            removed.append(p.name)
            if shutil.disk_usage(output_dir).free >= need:
                break
        print(f"the disk under {output_dir} had {free / 1e9:.2f} GB free and checkpoint {final.name} needs "
              f"{need / 1e9:.2f} GB: removed {', '.join(removed)} first (checkpoint.keep_last={keep_last} prunes "
              "them once it is complete anyway)")
        return
    raise CheckpointError(f"could not write checkpoint {final}: it needs {need / 1e9:.2f} GB and {free / 1e9:.2f} GB "
                          f"are free under {output_dir} ({_room_advice(room_keeping, need, keep_last, keep)})")


def _room_advice(room_keeping, need: int, keep_last: Optional[int], keep: int) -> str:
    """What would make room: a lower keep_last where pruning more would, else space."""
    for k in range(keep - 1, 0, -1):
        if room_keeping(k)[1] >= need:
            return f"free some space, move run.output_dir, or lower checkpoint.keep_last to {k + 1}"
    return "free some space or move run.output_dir"


def write_failure(error: BaseException, output_dir: Path, keep_last: Optional[int]) -> str:
    """Why a file could not be written, in a few words, with what to do where it is space."""
    cause = _root_cause(error)
    full = cause in ("No space left on device", "File too large", "Disk quota exceeded")
    if not full and "unexpected pos" in cause:  # torch.save's zip writer on a short write (ENOSPC, EFBIG)
        cause, full = "the disk is full: torch.save could not write the whole file", True
    if not full:
        return cause
    found = [p for _, p in list_checkpoints(output_dir) if is_complete(p)]
    lower = f", or lower checkpoint.keep_last (now {keep_last})" if keep_last and keep_last > 1 and len(found) > 1 else ""
    return f"{cause} (free some space under {output_dir}, or move run.output_dir{lower})"


def _root_cause(err: BaseException) -> str:
    """The OS error behind a library's wrapper exception, e.g. 'No space left on device'."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return _one_line(err) if not str(err).strip() else str(err).strip().splitlines()[0]


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
    parts=None,
    rank: int = 0,
) -> TrainState:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker); refusing to load it")
    parts = parts or TorchParts(model, optimizer)
    try:
        state = read_train_state(path / "trainer_state.json")
        parts.load(path)
        if scheduler is not None:
            scheduler.load_state_dict(_torch_load(path / "scheduler.pt"))
        if restore_rng:  # this rank's own stream where the run had this rank, else rank 0's
            own = path / f"rng_rank{rank}.pt"
            set_rng_state(_torch_load(own if rank and own.is_file() else path / "rng.pt"))
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
    if isinstance(data, dict) and "world_size" in data:  # absent in checkpoints of single-process runs before it
        ints = (*ints, "world_size")
    if (not isinstance(data, dict) or set(data) - {*ints, "data"}
            or any(not isinstance(data.get(k), int) or isinstance(data.get(k), bool) or data[k] < 0 for k in ints)
            or not (data.get("data") is None or isinstance(data["data"], dict))):
        raise CheckpointError(f"{path} does not hold a trainer state (step, tokens_seen >= 0, data a mapping): "
                              f"{str(data)[:80]}")
    if data["step"] > 0 and not data.get("data"):  # every checkpoint after a step records where the data is
        raise CheckpointError(f"{path} has no data position ('data'), so the run cannot go on with its data order: "
                              "resume from another checkpoint")
    return TrainState(**data)


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
