"""Exact-size, page-aligned host memory for offloaded tensors, sub-allocated by a fixed layout.

torch's ``pin_memory()`` goes through the CUDA caching host allocator, which rounds every
block up to a power of two (pytorch #95823): a 1.01 GiB optimizer shard costs 2 GiB of locked
host RAM. MemAscend cut peak host memory 55.7% by allocating exactly and registering with
``cudaHostRegister`` instead. ``HostPool`` does that: one anonymous mmap of exactly the bytes
the layout needs (each slot rounded to ``align``, the whole to one page), optionally bound to
NUMA nodes, registered with CUDA when there is one, and handed out as tensor views that stay
the same every step.

Memory accounting: the OS maps pages on first touch, so an unpinned pool costs host RSS only
for the slots that have been *placed* (written). Registering with CUDA locks, and so touches,
every page at construction: a pinned pool costs ``nbytes`` of RSS from the start, still exact.

Lifetime: the mapping lives while the pool or any tensor from it is alive, and is unregistered
and unmapped when the last of them goes. ``close()`` releases it now; tensors taken from a
closed pool must not be used (they no longer hold data: their pages were given back to the OS
and read as zeros, which is safe but meaningless).

``resident_bytes()``: the bytes of every live pool's pages the OS holds now (``mincore``), and
``in_pool(address)``: whether an address lies in one, so a process can tell its host tiers' memory from the
rest of what it holds (trainer/memory.py's baseline).
"""

from __future__ import annotations

import ctypes
import difflib
import math
import mmap
import operator
import warnings
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

from .live_bytes import faking

PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20
PIN_MODES = ("auto", "on", "off")


def anonymous_mapping(nbytes: int) -> mmap.mmap:
    """Private zeroed memory straight from the OS, page-aligned; 2 MiB and more asks for transparent huge pages.

    Huge pages cut the kernel's per-page work (pinning, address translation) each time a device reads or
    writes the memory: O_DIRECT requests, DMA copies.
    """
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # a kernel without THP: ordinary pages work the same, a little slower
    return mm


@dataclass(frozen=True)
class Slot:
    """One tensor's place in a pool: ``offset`` bytes from the pool's start, ``nbytes`` exactly."""

    name: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _plan_slots(layout, align: int) -> list[Slot]:
    """Validate the layout and lay the slots out back to back, each starting on an ``align`` boundary."""
    if isinstance(align, bool) or not isinstance(align, int) or align < 1 or align & (align - 1) or align > PAGE:
        raise ValueError(f"align must be a power of two between 1 and the page size {PAGE}, got {align!r}")
    slots: list[Slot] = []
    seen: set[str] = set()
    offset = 0
    for entry in layout:
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            raise ValueError(f"layout entries must be (name, shape, dtype), got {entry!r}")
        name, shape, dtype = entry
        if not isinstance(name, str) or not name:
            raise ValueError(f"slot names must be non-empty strings, got {name!r}")
        if name in seen:
            raise ValueError(f"duplicate slot name {name!r} in the layout")
        seen.add(name)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"slot {name!r}: dtype must be a torch.dtype, got {dtype!r}")
        try:
            if isinstance(shape, (str, bytes)) or any(isinstance(d, bool) for d in shape):
                raise TypeError
            shape = tuple(operator.index(d) for d in shape)
        except TypeError:
            raise ValueError(f"slot {name!r}: shape must be a tuple of ints, got {shape!r}") from None
        if any(d <= 0 for d in shape):
            raise ValueError(f"slot {name!r}: every dimension must be positive, got shape {shape}")
        itemsize = dtype.itemsize
        # `.view(dtype)` on the byte buffer needs each slot's offset to be a multiple of the element size.
        if align % itemsize:
            raise ValueError(f"slot {name!r}: align={align} is not a multiple of {dtype} element size {itemsize}")
        nbytes = math.prod(shape) * itemsize
        slots.append(Slot(name, offset, nbytes, shape, dtype))
        offset += _round_up(nbytes, align)
    if not slots:
        raise ValueError("layout is empty: a pool needs at least one slot")
    return slots


def _cuda_pin_wanted(pin: str) -> bool:
    if pin not in PIN_MODES:
        raise ValueError(f"pin must be one of {PIN_MODES}, got {pin!r}")
    if pin == "off":
        return False
    if torch.cuda.is_available():
        return True
    if pin == "on":
        raise ValueError("pin='on' needs CUDA, and torch.cuda.is_available() is False; use pin='auto' or 'off'")
    return False


def clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error. A failed runtime call leaves its error there, and torch's check
    after the next kernel launch (cudaGetLastError) would report it as that kernel's own. torch's cudart
    binding has no cudaGetLastError: it is called in the runtime library torch loaded, through ctypes."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            libraries = sorted({line.split()[-1] for line in f if "libcudart" in line})
    except OSError:
        return
    for path in libraries:
        try:
            ctypes.CDLL(path).cudaGetLastError()
        except (OSError, AttributeError):
            continue


_LIVE: "weakref.WeakSet[_Mapping]" = weakref.WeakSet()  # every mapping of a pool not yet released
_libc = ctypes.CDLL(None, use_errno=True)
_mincore = getattr(_libc, "mincore", None)
if _mincore is not None:
    _mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _resident(addr: int, nbytes: int) -> int:
    """Bytes of [addr, addr + nbytes) (page aligned) the OS holds in memory now; every byte where mincore is
    missing or refuses (the conservative answer)."""
    pages = -(-nbytes // PAGE)
    if _mincore is None or pages == 0:
        return nbytes
    vec = (ctypes.c_ubyte * pages)()
    if _mincore(addr, pages * PAGE, vec) != 0:
        return nbytes
    return sum(b & 1 for b in bytes(vec)) * PAGE


def resident_bytes() -> int:
    """Bytes of every live host pool's pages that are in memory now (touched, or all of a pinned pool)."""
    return sum(_resident(m.addr, m.nbytes) for m in list(_LIVE) if not m.mm.closed and m.addr)


def in_pool(address: int) -> bool:
    """Whether `address` lies in a live host pool (a tensor viewing one: its bytes are the pool's)."""
    return any(m.addr <= address < m.addr + m.nbytes for m in list(_LIVE) if not m.mm.closed and m.addr)


class _Mapping:
    """The anonymous mmap and its CUDA registration; holds no tensor, so a finalizer may own it."""

    def __init__(self, nbytes: int, label: str):
        self.mm = anonymous_mapping(nbytes)
        self.nbytes = nbytes
        self.label = label
        self.addr = 0
        self.pinned = False

    def register(self) -> None:
        cudart = torch.cuda.cudart()
        try:
            torch.cuda.check_error(cudart.cudaHostRegister(self.addr, self.nbytes, 0))
        except torch.cuda.CudaError as err:
            clear_cuda_error()
            raise RuntimeError(f"cudaHostRegister of {self.nbytes} bytes for pool {self.label!r} failed: {err}") from None
        self.pinned = True

    def unregister(self) -> None:
        if not self.pinned:
            return
        self.pinned = False
        # A non_blocking copy may still be reading or writing these pages; let it land first.
        torch.cuda.synchronize()
        torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(self.addr))

    def release(self) -> None:
        """Unregister and unmap; only once nothing can reach the memory any more."""
        if not self.mm.closed:
            self.unregister()
            self.mm.close()

    def evict(self) -> None:
        """Unregister and give the pages back to the OS, keeping the addresses mapped for live views."""
        if not self.mm.closed:
            self.unregister()
            self.mm.madvise(mmap.MADV_DONTNEED)


def _finalize_release(mapping: _Mapping) -> None:
    try:
        mapping.release()
    except Exception as err:  # noqa: BLE001 -- raising here would surface in whatever freed the last view
        warnings.warn(f"releasing host pool {mapping.label!r} failed: {err}", RuntimeWarning, stacklevel=1)


class HostPool:
    """Host memory for a fixed set of named tensors, exact-size and reused across steps.

    ``layout`` is ``[(name, shape, dtype), ...]``. ``pin``: ``"auto"`` registers with CUDA when
    it is available, ``"on"`` demands it, ``"off"`` never registers. ``numa_nodes`` binds the
    region (interleaved over them with ``interleave=True``) before any page is touched.
    Placing a tensor means writing its slot; only then does it cost host RAM (unless pinned).
    """

    def __init__(
        self,
        layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        pin: str = "auto",
        numa_nodes: Sequence[int] | None = None,
        interleave: bool = False,
        numa_local_share: float | None = None,
        align: int = 64,
        name: str = "host",
    ):
        self.name = name
        self._slots = {slot.name: slot for slot in _plan_slots(layout, align)}
        want_pin = _cuda_pin_wanted(pin)
        if numa_nodes is not None:
            numa_nodes = list(numa_nodes)
            if not numa_nodes:
                raise ValueError(f"pool {name!r}: numa_nodes is empty; pass None for the default placement")
        elif interleave:
            raise ValueError(f"pool {name!r}: interleave=True needs numa_nodes to interleave over")
        self._numa = (numa_nodes, interleave)
        self._local_share = numa_local_share
        last = list(self._slots.values())[-1]
        self.nbytes = _round_up(last.offset + _round_up(last.nbytes, align), PAGE)

        if faking():  # a dry run: the pool is one fake tensor, no memory behind it
            self._mapping, self._closed = None, False
            self._tensors = self._views(torch.empty(self.nbytes, dtype=torch.uint8))
            return
        self._mapping = _Mapping(self.nbytes, name)
        self._buffer = memoryview(self._mapping.mm)
        # The finalizer owns the mapping but not the memoryview, which every tensor's storage
        # references: it runs once the pool and all its tensors are gone, and unregisters
        # before the mapping can be unmapped. At exit the OS reclaims it; CUDA may be gone.
        self._finalizer = weakref.finalize(self._buffer, _finalize_release, self._mapping)
        self._finalizer.atexit = False
        self._bytes = torch.frombuffer(self._buffer, dtype=torch.uint8)
        self._mapping.addr = self._bytes.data_ptr()
        _LIVE.add(self._mapping)
        try:
            if numa_nodes is not None:
                from longtune.offload.numa import bind_memory
                from longtune.offload.placement import Placement, bind_placement

                # Pages take their node at first touch, so the policy must be set before anything writes.
                if self._local_share is None:
                    bind_memory(self._mapping.addr, self.nbytes, numa_nodes, interleave)
                else:  # the planned local share below an even split: head interleaved, tail on CXL
                    local = int(self._local_share * self.nbytes)
                    bind_placement(self._mapping.addr, self.nbytes,
                                   Placement(name, tuple(numa_nodes), interleave, local, self.nbytes - local))
            if want_pin:
                torch.cuda.init()  # register under torch's primary context, not a fresh one
                self._mapping.register()
        except BaseException:
            self.close()
            raise
        self._tensors = self._views(self._bytes)
        self._closed = False

    def _views(self, pool_bytes: torch.Tensor) -> dict[str, torch.Tensor]:
        return {slot.name: pool_bytes[slot.offset : slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)
                for slot in self._slots.values()}

    @property
    def pinned(self) -> bool:
        return self._mapping is not None and self._mapping.pinned

    @property
    def closed(self) -> bool:
        return getattr(self, "_closed", True)

    def tensor(self, name: str) -> torch.Tensor:
        """The slot as a tensor view into the pool (no copy); the same tensor on every call.

        Callers must not change its metadata in place (``resize_``, ``set_``, ``unsqueeze_``):
        every later caller gets the same object.
        """
        if self.closed:
            raise RuntimeError(f"pool {self.name!r} is closed; its tensors must not be used")
        try:
            return self._tensors[name]
        except KeyError:
            near = difflib.get_close_matches(name, self._slots, n=3, cutoff=0.0)
            raise KeyError(f"no slot {name!r} in pool {self.name!r}; nearest: {', '.join(near)}") from None

    def slots(self) -> list[Slot]:
        return list(self._slots.values())

    def close(self) -> None:
        """Unregister and unmap now. Tensors taken from this pool must not be used afterwards. Idempotent."""
        if getattr(self, "_mapping", None) is None:
            return
        self._closed = True
        # torch.frombuffer keeps a reference to the memoryview, not a buffer export, so the
        # finalizer is the only reliable sign that no tensor can reach the memory. Dropping our
        # own references runs it (unregister + munmap) unless the caller still holds a view;
        # then the mapping must stay, but its pages and its CUDA registration can go now.
        self._tensors = {}
        self._bytes = None
        self._buffer = None
        if self._finalizer.alive:
            self._mapping.evict()
        self._mapping = None

    def __enter__(self) -> HostPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            state = "closed"
        else:
            state = "pinned" if self.pinned else "pageable"
            nodes, interleave = self._numa
            if nodes is not None:
                state += f", numa {'interleave' if interleave else 'bind'} {nodes}"
        return f"HostPool({self.name}, {_format_bytes(self.nbytes)} in {len(self._slots)} slots, {state})"


def exact_pinned_empty(shape: Sequence[int], dtype: torch.dtype, *, pin: str = "auto") -> torch.Tensor:
    """One uninitialised tensor in its own exact-size, page-aligned (pinned when CUDA is there) allocation.

    For staging buffers. The tensor (and any view of it) keeps the memory alive; it is
    unregistered and unmapped when the last of them is freed.
    """
    pool = HostPool([("tensor", tuple(shape), dtype)], pin=pin, align=max(64, dtype.itemsize), name="staging")
    return pool.tensor("tensor")
