"""NVMe tier: a scratch store that keeps CPU tensors in files, with asynchronous reads and writes.

    with NvmeStore("/nvme/longtune") as store:
        store.write_async("layer3.exp_avg", t).result()
        store.read("layer3.exp_avg", out)

Every request is cut into `block_bytes` pieces run by a pool of `workers` threads, so one large tensor
keeps `workers` requests in flight on the device. Two ways to move a piece: `os.pwrite`/`os.preadv`
("threads", portable) or DeepSpeed's libaio op ("aio", used when it is already built). With O_DIRECT,
pieces whose memory is not page aligned, and the odd tail of a tensor, go through a bounded pool of
page-aligned staging buffers; the file is padded to a multiple of 4096 bytes.

A write lands in a temporary file that replaces the key's file only once every byte is written, so a
failed write never leaves a key that looks valid and the previous version stays readable. Each piece
carries an xxh3_64 checksum kept in memory; a read verifies it, so a damaged file is an error, never
silently wrong numbers. The store is scratch space: close() deletes its files.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import errno
import importlib.util
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

try:
    import xxhash

    _digest = xxhash.xxh3_64_intdigest
except ImportError:  # xxhash is optional; crc32 is slower but catches the same flipped bytes
    import zlib

    _digest = zlib.crc32

ALIGN = 4096  # O_DIRECT needs buffer address, file offset and length aligned to the logical block size
_DIRECT_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class NvmeError(OSError):
    """An NVMe store operation failed; the message says what, where and why."""


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _np(t: torch.Tensor):
    """A uint8 tensor as a numpy array: a zero-copy buffer for pwrite/preadv/xxhash."""
    return t.numpy()


def _preallocate(fd: int, size: int) -> None:
    # Reserving every block before the first byte is written turns "disk full" into one clean error up
    # front (DeepSpeed's aio op does not report a failed request at all), and gives the file few extents.
    if size == 0 or _libc.fallocate(fd, 0, 0, size) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err))
    os.ftruncate(fd, size)  # a filesystem without fallocate: sparse, and ENOSPC may come from a write


def page_aligned_empty(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised CPU tensor on whole pages, which the store moves with O_DIRECT without staging.

    torch's own CPU tensors start 64 bytes into a page, so with O_DIRECT every piece of them is copied
    through a staging buffer; swap buffers that live for the whole run should come from here."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, _round_up(nbytes)), dtype=torch.uint8)[:nbytes].view(dtype).view(shape)


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


class _StagingPool:
    """At most `count` page-aligned buffers of `size` bytes, made on first use and reused."""

    def __init__(self, count: int, size: int, allocate):
        self.count, self.size, self._allocate = count, size, allocate
        self._free: list[torch.Tensor] = []
        self._all: list[torch.Tensor] = []
        self._cond = threading.Condition()
        self.in_use_bytes = self.max_in_use_bytes = 0

    def acquire(self) -> torch.Tensor:
        with self._cond:
            while not self._free and len(self._all) == self.count:
                self._cond.wait()
            if self._free:
                buf = self._free.pop()
            else:
                buf = self._allocate(self.size)
                self._all.append(buf)
            self.in_use_bytes += self.size
            self.max_in_use_bytes = max(self.max_in_use_bytes, self.in_use_bytes)
            return buf

    def release(self, buf: torch.Tensor) -> None:
        with self._cond:
            self._free.append(buf)
            self.in_use_bytes -= self.size
            self._cond.notify()

    def drain(self) -> list[torch.Tensor]:
        with self._cond:
            buffers, self._all, self._free = self._all, [], []
            return buffers


class _ThreadsIO:
    name = "threads"

    def allocate(self, size: int) -> torch.Tensor:
        return page_aligned_empty(size, torch.uint8)

    def free(self, buf: torch.Tensor) -> None:
        pass  # the mmap goes with the last reference to the tensor

    def can_use_directly(self, data: torch.Tensor) -> bool:
        return True

    def write(self, fd: int, data: torch.Tensor, offset: int) -> None:
        view, done = memoryview(_np(data)), 0
        while done < len(view):
            written = os.pwrite(fd, view[done:], offset + done)
            if written == 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            done += written

    def read(self, fd: int, data: torch.Tensor, offset: int) -> int:
        view, done = memoryview(_np(data)), 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                break  # end of file: the caller reports the short read
            done += got
        return done


class _AioIO:
    """DeepSpeed's libaio op; one handle per worker thread because a handle's wait() covers all its requests."""

    name = "aio (DeepSpeed)"

    def __init__(self, op, block_bytes: int, queue_depth: int, folder: Path):
        self._make = lambda: op.aio_handle(block_bytes, queue_depth, False, True, 1)
        self._local = threading.local()
        self._allocator = self._make()
        # The op logs a once-per-process warning on its first write from inside std::call_once, taking the
        # GIL there, while the fd form of async_pwrite holds the GIL: two threads making the first write at
        # once deadlock. So the first write happens here, on one thread; it also proves the op works.
        probe, buf = folder / ".aio-probe", self.allocate(ALIGN)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o600)
        try:
            if self._allocator.async_pwrite(buf, fd, 0) != 0 or self._allocator.wait() != 1:
                raise NvmeError(f"DeepSpeed's aio op could not write a test page at {folder}")
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
            self.free(buf)

    def _handle(self):
        if not hasattr(self._local, "handle"):
            self._local.handle = self._make()
        return self._local.handle

    def allocate(self, size: int) -> torch.Tensor:
        # Page-locked by DeepSpeed's manager, so the op reads it in place instead of through a full-size
        # bounce buffer of its own (which would break the staging bound).
        return self._allocator.new_cpu_locked_tensor(size, torch.empty(0, dtype=torch.uint8))

    def free(self, buf: torch.Tensor) -> None:
        self._allocator.free_cpu_locked_tensor(buf)

    def can_use_directly(self, data: torch.Tensor) -> bool:
        return data.is_pinned() or self._allocator.is_pinned(data)

    def write(self, fd: int, data: torch.Tensor, offset: int) -> None:
        handle = self._handle()
        if handle.async_pwrite(data, fd, offset) != 0 or handle.wait() != 1:
            raise OSError(errno.EIO, "DeepSpeed aio write request failed")

    def read(self, fd: int, data: torch.Tensor, offset: int) -> int:
        # By /proc/self/fd so the op reads the very file this request opened, even if a newer write has
        # since replaced the key's file. The size was checked at open: the op aborts on a short file.
        if self._handle().sync_pread(data, f"/proc/self/fd/{fd}", offset) != 1:
            raise OSError(errno.EIO, "DeepSpeed aio read request failed")
        return data.numel()


def aio_is_built() -> bool:
    """Whether DeepSpeed's async_io op is compiled already (in the wheel or the torch extensions cache),
    found without importing deepspeed or compiling anything."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return False
    if any(Path(next(iter(spec.submodule_search_locations)), "ops", "aio").glob("async_io_op*.so")):
        return True
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:  # the same folder torch.utils.cpp_extension.load builds into
        from torch.utils.cpp_extension import get_default_build_root

        accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        if torch.version.hip:
            accel = f"rocm{torch.version.hip.replace('.', '')}"
        root = os.path.join(get_default_build_root(), f"py{sys.version_info[0]}{sys.version_info[1]}{sys.abiflags}_{accel}")
    return all(Path(root, name, f"{name}.so").exists() for name in ("async_io", "pin_memory"))


def _load_aio():
    hint = "apt-get install libaio-dev, or set backend: threads"
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)  # its accelerator and SSD-endurance notices, on every load
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except ImportError as exc:
        raise NvmeError(f"backend 'aio' needs deepspeed, which does not import ({exc}); pip install deepspeed, or set backend: threads") from exc
    builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        raise NvmeError(f"DeepSpeed's async_io op cannot be built here (libaio headers or library missing): {hint}")
    try:
        return builder.load(verbose=False)
    except Exception as exc:
        raise NvmeError(f"DeepSpeed's async_io op failed to build or load ({exc}): {hint}") from exc


class NvmeStore:
    """Tensors in files under `folder`, moved by a thread pool; see the module docstring."""

    def __init__(self, folder: str | Path, *, checksum: bool = True, direct: str = "auto", backend: str = "auto",
                 workers: int = 4, block_bytes: int = 1 << 20, staging_buffers: int = 4, fsync: bool = False):
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
            if backend == "aio" or (backend == "auto" and self.direct_io and aio_is_built()):
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
        self._pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="nvme")
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._entries: dict[str, _Entry] = {}
        self._floor: dict[str, int] = {}  # per key: generation of the last commit or delete; older writes lose
        self._pending: dict[str, _Job] = {}  # per key: the newest write not finished yet
        self._generations = itertools.count(1)
        self._outstanding = 0
        self._closed = False

    def _probe_direct(self, direct: str) -> bool:
        if direct == "off":
            return False
        probe, buf = self.path / ".direct-probe", mmap.mmap(-1, ALIGN)
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o600)
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
                            f"{stat.f_bavail * stat.f_frsize} free (writing key {job.key!r})")
        else:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            err = NvmeError(f"{action} key {job.key!r} failed at {job.path}: {reason}")
        err.errno = getattr(exc, "errno", None)
        err.__cause__ = exc
        return err

    def _job_done(self) -> None:
        with self._lock:
            self._outstanding -= 1
            self._idle.notify_all()

    # ------------------------------------------------------------------------------ writes

    def _start_write(self, job: _Job) -> None:
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | (os.O_DIRECT if self.direct_io else 0)
            job.fd = os.open(job.path, flags, 0o600)
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
        committed = False
        try:
            if job.fd is not None:
                if job.error is None and self.fsync:
                    os.fsync(job.fd)
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
            job.future.set_exception(self._error(exc, "writing", job))
        else:
            job.future.set_result(None)
        finally:
            if not committed:
                job.path.unlink(missing_ok=True)
            with self._lock:
                if self._pending.get(job.key) is job:
                    del self._pending[job.key]
            job.tensor = job.flat = None  # the caller may reuse its memory now
            self._job_done()

    # ------------------------------------------------------------------------------ reads

    def _start_read(self, job: _Job) -> None:
        try:
            with self._lock:  # snapshot and open together, so a concurrent replace cannot slip between
                entry = self._entries.get(job.key)
                if entry is None:
                    raise NvmeError(f"key {job.key!r} vanished from the NVMe store at {self.path} (deleted, or its write failed)")
                job.entry, job.path = entry, entry.path
                job.fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if self.direct_io else 0))
            self._check_shape(job.key, job.tensor, entry.dtype, entry.numel)
            size = os.fstat(job.fd).st_size
            if size < _round_up(entry.nbytes):
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
        try:
            if job.fd is not None:
                os.close(job.fd)
            if job.error is not None:
                raise job.error
        except BaseException as exc:
            job.future.set_exception(self._error(exc, "reading", job))
        else:
            job.future.set_result(None)
        finally:
            job.tensor = job.flat = None
            self._job_done()
