"""NVMe tier: a scratch store that keeps CPU tensors in files, with asynchronous reads and writes.

    with NvmeStore("/nvme/longtune") as store:
        store.write_async("layer3.exp_avg", t).result()
        store.read("layer3.exp_avg", out)

Every request is cut into `block_bytes` pieces run by a pool of `workers` threads, so one large tensor
keeps `workers` requests in flight on the device. How a piece reaches the file (thread-pool syscalls or
DeepSpeed's libaio op, staging for O_DIRECT) is in nvme_io.py; this module keeps the store's bookkeeping.
With O_DIRECT the file is padded to a multiple of 4096 bytes.

A write lands in a temporary file that replaces the key's file only once every byte is written, so a
failed write never leaves a key that looks valid and the previous version stays readable. Each piece
carries an xxh3_64 checksum (zlib.crc32 without the xxhash package) kept in memory; a read verifies it,
so a damaged file is an error, never silently wrong numbers. The store is scratch space: close() deletes its files.

Without O_DIRECT (a filesystem that refuses it, or direct="off") the bytes pass through the page cache, which the
kernel charges to the process's memory cgroup as if the process held them: a write is flushed and its pages
dropped (fdatasync, then POSIX_FADV_DONTNEED) before it completes, and a read drops what it read, so the tier's
bytes are on the drive, not in host memory.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import itertools
import mmap
import os
import re
import shutil
import sys
import threading
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from .live_bytes import faking
from .movers import worker_pool
from .nvme_io import (
    ALIGN, NvmeError, aio_is_built, page_aligned_empty,
    _O_DIRECT, _AioIO, _DryIO, _StagingPool, _ThreadsIO, _load_aio, _np, _preallocate, _round_up,
)

__all__ = ["ALIGN", "NvmeError", "NvmeStore", "aio_is_built", "page_aligned_empty"]

try:
    import xxhash

    _digest = xxhash.xxh3_64_intdigest
except ImportError:  # xxhash is optional; crc32 is slower but catches the same flipped bytes
    import zlib

    _digest = zlib.crc32

_DIRECT_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP)
# One request per piece. The block layer merges the adjacent requests of one libaio submitter up to the
# device's max_sectors_kb (4 MiB here, often more), but not the blocking pwrites of separate threads, so
# the pieces are that large themselves. bench/nvme_tier.py against fio on the same disk: with 1 MiB
# pieces the store wrote 0.75x fio (median of per-round ratios), with 4 MiB pieces 0.88x (fio at its
# better of 1 and 4 MiB); results in bench/results/nvme_tier-*2026-12-02.json.
DEFAULT_BLOCK_BYTES = 4 << 20


# What the memory runtime's parts keep under their keys (offload/optimizer.py, params.py, stash.py), for messages:
# a failed write names what it was writing, not only the key. Parameter group 0 holds the weights outside the
# decoder layers; group g >= 1 is decoder layer g - 1 (offload/groups.py).
_KEY_CONTENTS = (
    (re.compile(r"adamw-(\d+)"), "the optimizer state of {group}"),
    (re.compile(r"weights-(\d+)"), "the weights of {group}"),
    (re.compile(r"activations-(\d+)"), "the offloaded activations of decoder layer {index}"),
)


def what_key_holds(key: str) -> str:
    """In words, what a key holds: "the optimizer state of decoder layer 2 (key 'adamw-3')"."""
    for pattern, text in _KEY_CONTENTS:
        m = pattern.fullmatch(key)
        if m:
            index = int(m[1])
            group = "the embeddings, final norm and LM head" if index == 0 else f"decoder layer {index - 1}"
            return f"{text.format(group=group, index=index)} (key {key!r})"
    return f"key {key!r}"


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: torch.dtype
    numel: int
    nbytes: int
    digests: tuple[int, ...] | None  # one per block_bytes piece
    generation: int


class _Job:
    """One read or write request: its pieces count down, the last one to finish completes the future."""

    def __init__(self, key: str, tensor: torch.Tensor, generation: int):
        self.key, self.tensor, self.generation = key, tensor, generation
        self.dtype, self.numel = tensor.dtype, tensor.numel()
        self.flat = tensor.detach().reshape(-1).view(torch.uint8)
        self.nbytes = self.flat.numel()
        self.fd: int | None = None
        self.path: Path | None = None
        self.digests: list[int] | None = None
        self.entry: _Entry | None = None
        self.error: BaseException | None = None
        self.remaining = 0
        self.lock = threading.Lock()
        self.future: cf.Future = cf.Future()
        self.future.set_running_or_notify_cancel()  # the request cannot be withdrawn once issued

    def piece_done(self, exc: BaseException | None) -> bool:
        with self.lock:
            if exc is not None and self.error is None:
                self.error = exc
            self.remaining -= 1
            return self.remaining == 0


class NvmeStore:
    """Tensors in files under `folder`, moved by a thread pool; see the module docstring."""

    def __init__(self, folder: str | Path, *, checksum: bool = True, direct: str = "auto", backend: str = "auto",
                 workers: int = 4, block_bytes: int = DEFAULT_BLOCK_BYTES, staging_buffers: int = 4, fsync: bool = False):
        if direct not in ("auto", "on", "off"):
            raise ValueError(f"direct must be 'auto', 'on' or 'off', got {direct!r}")
        if backend not in ("auto", "threads", "aio"):
            raise ValueError(f"backend must be 'auto', 'threads' or 'aio', got {backend!r}")
        if workers < 1 or staging_buffers < 1:
            raise ValueError(f"workers and staging_buffers must be at least 1, got {workers} and {staging_buffers}")
        if block_bytes < ALIGN or block_bytes % ALIGN:
            raise ValueError(f"block_bytes must be a positive multiple of {ALIGN}, got {block_bytes}")
        self.folder, self.checksum, self.block_bytes = Path(folder), checksum, block_bytes
        # No fsync by default: the store is scratch that close() deletes and nothing reuses after a crash,
        # so durability buys nothing, while a flush per write would stall the pipeline on the device.
        self.fsync = fsync
        if self.folder.exists() and not self.folder.is_dir():
            raise NvmeError(f"cannot use {self.folder} for the NVMe store: it is a file, not a folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.path = self.folder / f"longtune-nvme-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.path.mkdir()
        except OSError as exc:
            raise NvmeError(f"cannot use {self.folder} for the NVMe store: {exc.strerror or exc}") from exc
        self._remove_files = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)
        try:
            self.direct_io = self._probe_direct(direct)
            if backend == "aio" and not self.direct_io:
                raise NvmeError(f"backend 'aio' needs O_DIRECT, which is off or refused at {self.folder}; set backend: threads")
            # "auto" takes aio only with a GPU: without one no memory counts as pinned to it, aio copies every
            # byte through staging, and measured 0.6-0.7x fio where the thread pool reached 0.9x.
            use_aio = backend == "auto" and self.direct_io and torch.cuda.is_available() and aio_is_built()
            if faking():  # a dry run: no bytes to write, none to check
                self._io, self.direct_io, self.checksum = _DryIO(), False, False
            elif backend == "aio" or use_aio:
                try:
                    self._io = _AioIO(_load_aio(), block_bytes, max(8, workers), self.path)
                except (NvmeError, OSError) as exc:
                    if backend == "aio":
                        raise exc if isinstance(exc, NvmeError) else NvmeError(
                            f"DeepSpeed's aio op failed at {self.path}: {exc.strerror or exc}") from exc
                    self._io = _ThreadsIO()  # "auto": a cached op that no longer loads is no reason to fail
            else:
                self._io = _ThreadsIO()
        except BaseException:
            self._remove_files()
            raise
        self.backend_name = self._io.name
        self._staging = _StagingPool(staging_buffers, block_bytes, self._io.allocate)
        self._pool = worker_pool("nvme", workers)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._entries: dict[str, _Entry] = {}
        self._floor: dict[str, int] = {}  # per key: generation of the last commit or delete; older writes lose
        self._pending: dict[str, _Job] = {}  # per key: the newest write not finished yet
        self._generations = itertools.count(1)
        self._outstanding = 0
        self.bytes_written = self.bytes_read = 0  # completed requests only: what the metrics report
        self._closed = False

    def _probe_direct(self, direct: str) -> bool:
        if direct == "off":
            return False
        if not _O_DIRECT:
            if direct == "on":
                raise NvmeError(f"O_DIRECT does not exist on {sys.platform}; set direct: auto or off")
            return False
        probe, buf = self.path / ".direct-probe", mmap.mmap(-1, ALIGN)
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | _O_DIRECT | os.O_CLOEXEC, 0o600)
            try:
                os.pwrite(fd, buf, 0)
            finally:
                os.close(fd)
            return True
        except OSError as exc:
            if exc.errno not in _DIRECT_REFUSED:
                raise NvmeError(f"cannot write to the NVMe store at {self.path}: {exc.strerror}") from exc
            if direct == "on":
                raise NvmeError(f"O_DIRECT refused at {self.folder} ({exc.strerror}); set direct: auto or off") from exc
            return False
        finally:
            buf.close()
            probe.unlink(missing_ok=True)

    @property
    def max_staging_bytes_used(self) -> int:
        """Peak bytes of staging buffers in use at once; never above staging_buffers x block_bytes."""
        return self._staging.max_in_use_bytes

    # ------------------------------------------------------------------------------ public API

    def write_async(self, key: str, tensor: torch.Tensor) -> cf.Future:
        """Store `tensor` (contiguous, CPU) under `key`; leave it unchanged until the future is done."""
        self._check_tensor("write", key, tensor)
        with self._lock:
            self._check_open()
            job = _Job(key, tensor, next(self._generations))
            job.path = self.path / f".{self._file_name(key)}.{job.generation}.tmp"
            self._pending[key] = job
            self._outstanding += 1
        self._pool.submit(self._start_write, job)
        return job.future

    def read_async(self, key: str, out: torch.Tensor) -> cf.Future:
        """Fill `out` with the newest version of `key` (waiting for a write of it still in flight)."""
        self._check_tensor("read", key, out)
        with self._lock:
            self._check_open()
            pending, entry = self._pending.get(key), self._entries.get(key)
            if pending is None and entry is None:
                raise KeyError(f"no key {key!r} in the NVMe store at {self.path}")
            if pending is not None:
                self._check_shape(key, out, pending.dtype, pending.numel)
            else:
                self._check_shape(key, out, entry.dtype, entry.numel)
            job = _Job(key, out, 0)
            self._outstanding += 1
        if pending is None:
            self._pool.submit(self._start_read, job)
        else:
            pending.future.add_done_callback(lambda _: self._pool.submit(self._start_read, job))
        return job.future

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.write_async(key, tensor).result()

    def read(self, key: str, out: torch.Tensor) -> None:
        self.read_async(key, out).result()

    def nbytes(self, key: str) -> int:
        with self._lock:
            if key not in self._entries:
                raise KeyError(f"no key {key!r} in the NVMe store at {self.path}")
            return self._entries[key].nbytes

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def delete(self, key: str) -> None:
        """Forget `key` and remove its file; a write of it still in flight is dropped when it finishes."""
        with self._lock:
            if key not in self._entries and key not in self._pending:
                raise KeyError(f"no key {key!r} in the NVMe store at {self.path}")
            self._floor[key] = next(self._generations)
            entry = self._entries.pop(key, None)
            if entry is not None:
                entry.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Wait for requests in flight, then delete the store's folder and free its staging buffers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._outstanding:
                self._idle.wait()
        self._pool.shutdown(wait=True)
        for buf in self._staging.drain():
            self._io.free(buf)
        self._remove_files()

    def __enter__(self) -> "NvmeStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ helpers

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the NVMe store at {self.path} is closed")

    @staticmethod
    def _check_tensor(op: str, key: str, tensor: torch.Tensor) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError(f"{op}: key must be a non-empty string, got {key!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" or tensor.layout != torch.strided:
            what = f"a {tensor.device} tensor" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{op}({key!r}) needs a dense CPU tensor, got {what}")
        if not tensor.is_contiguous():
            raise ValueError(f"{op}({key!r}) needs a contiguous tensor (call .contiguous() first)")

    @staticmethod
    def _check_shape(key: str, out: torch.Tensor, dtype: torch.dtype, numel: int) -> None:
        if (out.dtype, out.numel()) != (dtype, numel):
            raise ValueError(f"read({key!r}): out holds {out.numel()} {out.dtype} elements, "
                             f"the stored tensor {numel} {dtype} elements")

    @staticmethod
    def _file_name(key: str) -> str:
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:64]
        return f"{readable}-{_digest(key.encode()) & 0xFFFFFFFF:08x}.swp"

    def _pieces(self, job: _Job):
        return range(-(-job.nbytes // self.block_bytes))

    def _launch(self, job: _Job, piece_fn, finish_fn) -> None:
        pieces = self._pieces(job)
        job.remaining = len(pieces)
        if not pieces:
            return finish_fn(job)
        for index in pieces:
            self._pool.submit(self._run_piece, job, index, piece_fn, finish_fn)

    def _run_piece(self, job: _Job, index: int, piece_fn, finish_fn) -> None:
        exc = None
        if job.error is None:  # after a failure the remaining pieces are skipped
            try:
                piece_fn(job, index)
            except BaseException as e:
                exc = e
        if job.piece_done(exc):
            finish_fn(job)

    def _span(self, job: _Job, index: int) -> tuple[int, int, int, bool]:
        """Offset, length and on-disk length of a piece, and whether it must go through staging."""
        offset = index * self.block_bytes
        length = min(self.block_bytes, job.nbytes - offset)
        if not self.direct_io:
            return offset, length, length, False
        io_length = _round_up(length)
        staged = (job.flat.data_ptr() + offset) % ALIGN != 0 or io_length != length
        return offset, length, io_length, staged or not self._io.can_use_directly(job.flat[offset:offset + length])

    def _error(self, exc: BaseException, action: str, job: _Job) -> NvmeError:
        if isinstance(exc, NvmeError):
            return exc
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            stat = os.statvfs(self.path)
            err = NvmeError(f"disk full at {self.folder}: needed {_round_up(job.nbytes)} bytes, "
                            f"{stat.f_bavail * stat.f_frsize} free, writing {what_key_holds(job.key)} to the NVMe "
                            f"tier's file {job.path} (free some space there, or give the NVMe tier another drive: "
                            "memory.nvme_path)")
        else:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            err = NvmeError(f"{action} {what_key_holds(job.key)} failed at {job.path} (the NVMe tier): {reason}")
        err.errno = getattr(exc, "errno", None)
        err.__cause__ = exc
        return err

    def _drop_cached(self, fd: int, flush: bool) -> None:
        """Without O_DIRECT: the file's pages out of the page cache (after writing them back: dirty pages stay)."""
        if self.direct_io or isinstance(self._io, _DryIO) or not hasattr(os, "posix_fadvise"):
            return
        if flush:
            os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _job_done(self) -> None:
        with self._lock:
            self._outstanding -= 1
            self._idle.notify_all()

    # ------------------------------------------------------------------------------ writes

    def _start_write(self, job: _Job) -> None:
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | (_O_DIRECT if self.direct_io else 0)
            job.fd = os.open(job.path, flags, 0o600)
            if not isinstance(self._io, _DryIO):
                _preallocate(job.fd, _round_up(job.nbytes))
            job.digests = [0] * len(self._pieces(job)) if self.checksum else None
        except BaseException as exc:
            job.error = exc
            job.remaining = 0
            return self._finish_write(job)
        self._launch(job, self._write_piece, self._finish_write)

    def _write_piece(self, job: _Job, index: int) -> None:
        offset, length, io_length, staged = self._span(job, index)
        data = job.flat[offset:offset + length]
        if staged:
            buf = self._staging.acquire()
            try:
                buf[:length].copy_(data)
                buf[length:io_length].zero_()
                if job.digests is not None:
                    job.digests[index] = _digest(_np(buf[:length]))
                self._io.write(job.fd, buf[:io_length], offset)
            finally:
                self._staging.release(buf)
        else:
            if job.digests is not None:
                job.digests[index] = _digest(_np(data))
            self._io.write(job.fd, data, offset)

    def _finish_write(self, job: _Job) -> None:
        committed, error = False, None
        try:
            if job.fd is not None:
                if job.error is None and self.fsync:
                    os.fsync(job.fd)
                if job.error is None:
                    self._drop_cached(job.fd, flush=True)
                os.close(job.fd)  # on some filesystems a deferred write error only shows up here
            if job.error is not None:
                raise job.error
            with self._lock:
                if job.generation > self._floor.get(job.key, 0):  # else superseded or deleted meanwhile
                    final = self.path / self._file_name(job.key)
                    os.replace(job.path, final)
                    self._entries[job.key] = _Entry(final, job.dtype, job.numel, job.nbytes,
                                                    tuple(job.digests) if job.digests is not None else None,
                                                    job.generation)
                    self._floor[job.key] = job.generation
                    committed = True
        except BaseException as exc:
            error = self._error(exc, "writing", job)
        try:
            if not committed:
                job.path.unlink(missing_ok=True)
        except OSError:
            pass  # best effort: close() removes the whole folder anyway
        with self._lock:
            if self._pending.get(job.key) is job:
                del self._pending[job.key]
            if error is None:  # a superseded write reached the disk too: it counts
                self.bytes_written += job.nbytes
        self._resolve(job, error)

    def _resolve(self, job: _Job, error: NvmeError | None) -> None:
        """Complete a request after everything it touched is tidied up, so its caller never sees leftovers."""
        job.tensor = job.flat = None  # the caller may reuse its memory now
        self._job_done()
        if error is None:
            job.future.set_result(None)
        else:
            job.future.set_exception(error)

    # ------------------------------------------------------------------------------ reads

    def _start_read(self, job: _Job) -> None:
        try:
            with self._lock:  # snapshot and open together, so a concurrent replace cannot slip between
                entry = self._entries.get(job.key)
                if entry is None:
                    raise NvmeError(f"key {job.key!r} vanished from the NVMe store at {self.path} (deleted, or its write failed)")
                job.entry, job.path = entry, entry.path
                job.fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC | (_O_DIRECT if self.direct_io else 0))
            self._check_shape(job.key, job.tensor, entry.dtype, entry.numel)
            size = os.fstat(job.fd).st_size
            if size < _round_up(entry.nbytes) and not isinstance(self._io, _DryIO):
                raise NvmeError(f"short read of key {job.key!r}: {entry.path} holds {size} bytes, "
                                f"expected {_round_up(entry.nbytes)} (truncated)")
        except BaseException as exc:
            job.error = exc
            job.remaining = 0
            return self._finish_read(job)
        self._launch(job, self._read_piece, self._finish_read)

    def _read_piece(self, job: _Job, index: int) -> None:
        offset, length, io_length, staged = self._span(job, index)
        data = job.flat[offset:offset + length]
        buf = self._staging.acquire() if staged else None
        try:
            target = buf[:io_length] if staged else data
            got = self._io.read(job.fd, target, offset)
            if got < length:
                raise NvmeError(f"short read of key {job.key!r} from {job.path}: "
                                f"got {got} of {length} bytes at offset {offset}")
            got_bytes = buf[:length] if staged else data
            if job.entry.digests is not None and _digest(_np(got_bytes)) != job.entry.digests[index]:
                raise NvmeError(f"checksum mismatch for key {job.key!r} in {job.path} "
                                f"(bytes {offset}..{offset + length}): the file is damaged")
            if staged:
                data.copy_(buf[:length])
        finally:
            if staged:
                self._staging.release(buf)

    def _finish_read(self, job: _Job) -> None:
        error = None
        try:
            if job.fd is not None:
                self._drop_cached(job.fd, flush=False)
                os.close(job.fd)
            if job.error is not None:
                raise job.error
        except BaseException as exc:
            error = self._error(exc, "reading", job)
        if error is None:
            with self._lock:
                self.bytes_read += job.nbytes
        self._resolve(job, error)
