"""How the NVMe tier moves bytes: the I/O backends, the staging pool and page-aligned buffers.

`NvmeStore` (nvme.py) cuts each request into pieces and keeps the keys, generations and checksums;
this module moves one piece. Two ways to do that: `os.pwrite`/`os.preadv` ("threads", portable) or
DeepSpeed's libaio op ("aio", used when it is already built). With O_DIRECT, pieces whose memory is not
page aligned, and the odd tail of a tensor, go through a bounded pool of page-aligned staging buffers.
Kept apart from the store so the bookkeeping reads without the syscall and DeepSpeed details.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import os
import sys
import threading
from pathlib import Path

import torch

from .live_bytes import faking
from .pinned import anonymous_mapping

ALIGN = 4096  # O_DIRECT needs buffer address, file offset and length aligned to the logical block size
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux only; elsewhere the store runs buffered
_fallocate = getattr(ctypes.CDLL(None, use_errno=True), "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


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
    if size == 0:
        return
    if _fallocate is not None:
        if _fallocate(fd, 0, 0, size) == 0:
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
    if nbytes == 0 or faking():  # (a dry run's buffers hold no data)
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(anonymous_mapping(_round_up(nbytes)), dtype=torch.uint8)[:nbytes].view(dtype).view(shape)


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


class _DryIO(_ThreadsIO):
    """A dry run's drive (trainer/dry_run.py): fake tensors hold no bytes, so nothing is written or read; the
    files are made, empty, and the store counts the bytes as it does for a drive."""

    name = "dry run: no I/O"

    def write(self, fd: int, data: torch.Tensor, offset: int) -> None:
        pass

    def read(self, fd: int, data: torch.Tensor, offset: int) -> int:
        return data.numel() * data.element_size()


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
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | _O_DIRECT | os.O_CLOEXEC, 0o600)
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
