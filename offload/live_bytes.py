"""Bytes of the tensors allocated while a block of code runs, and their peak, on any device (meta included).

A `TorchDispatchMode` sees every op's outputs. A storage first seen as an op's output, and never before as an
input, was allocated inside the block: it is counted until the last tensor that refers to it (the output and
any view of it made since) is gone. Storages that were there before the block (its inputs, their views, what
an in-place op returns) are never counted. On the meta device nothing holds data, so this measures what a step
would allocate without running it: the planner's descriptions of transient buffers are checked against it.

The dry run (trainer/dry_run.py) counts per device (`device_live`, `device_peak`: the meta device stands for
the GPU, the fake CPU tensors for the host), counts the weights made before it as if made inside (`adopt`), and
keeps the step's timeline (`samples`: op count and bytes per device wherever they changed).

What it cannot see: memory a kernel allocates for itself and frees before returning (FlashAttention's
backward accumulators, cuBLAS workspaces), the caching allocator's rounding and fragmentation.
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def faking() -> bool:
    """Is a FakeTensorMode on (a dry run)? Then host memory is a fake tensor too, and work runs on one thread."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def holds_no_data(t: torch.Tensor) -> bool:
    """A meta tensor, or a fake one (a dry run's host tensors): its storage is on the meta device."""
    return t.untyped_storage().device.type == "meta"


class LiveBytes(TorchDispatchMode):
    def __init__(self, record: bool = False):
        super().__init__()
        self.live = 0  # bytes of the storages allocated inside and alive now
        self.peak = 0
        self.device_live: dict[str, int] = defaultdict(int)  # the same, per device type
        self.device_peak: dict[str, int] = defaultdict(int)
        self.ops = 0
        self.samples: list[tuple[int, dict[str, int]]] | None = [] if record else None
        self._storages: dict[int, list] = {}  # storage id -> [nbytes, device type, {id(tensor): weak reference}]
        self._outside: dict[int, list] = {}  # storages that existed before (seen as inputs first) -> their tensors
        self._where: dict[int, tuple[dict, int]] = {}  # id(tensor) -> (its table, its storage id)
        self._data_sets = _DataSets(self)

    def __enter__(self):
        self._data_sets.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._data_sets.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and _key(t) not in self._storages:
                self._refer(self._outside, _key(t), t)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        self.ops += 1
        return out

    def adopt(self, tensors) -> None:
        """Count these tensors' storages as if allocated inside (the weights of a dry run, made before it)."""
        for t in tensors:
            if _key(t) not in self._outside:
                self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        key = _key(t)
        if key in self._outside:
            self._refer(self._outside, key, t)
            return
        if key not in self._storages:
            self._add(t.device.type, t.untyped_storage().nbytes())
        self._refer(self._storages, key, t)

    def _add(self, device: str, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.device_live[device] += nbytes
        self.device_peak[device] = max(self.device_peak[device], self.device_live[device])
        if self.samples is not None:
            self.samples.append((self.ops, dict(self.device_live)))

    def _refer(self, table: dict, key: int, t: torch.Tensor) -> None:
        """t refers to storage `key`; the entry goes (and a counted storage's bytes with it) with its last tensor.
        The storage's id may be reused once it is gone: the entry must not outlive it."""
        if key not in table:
            table[key] = [t.untyped_storage().nbytes() if table is self._storages else 0, t.device.type, {}]
        refs = table[key][2]
        if id(t) not in refs:
            refs[id(t)] = weakref.ref(t, lambda ref, i=id(t): self._dropped(table, key, i))
            self._where[id(t)] = (table, key)

    def _dropped(self, table: dict, key: int, tensor_id: int) -> None:
        entry = table.get(key)
        if entry is None or entry[2].pop(tensor_id, None) is None:
            return
        if self._where.get(tensor_id) == (table, key):
            del self._where[tensor_id]
        if not entry[2]:
            del table[key]
            if table is self._storages:
                self._add(entry[1], -entry[0])

    def _data_set(self, t: torch.Tensor) -> None:
        """`t.data = other` gave t another storage (the runtime frees a graph leaf's bytes so): t no longer keeps
        its old one alive. No op is dispatched for it; the function mode below reports it."""
        where = self._where.get(id(t))
        if where is not None and where[1] != _key(t):
            self._dropped(*where, id(t))
        self._track(t)

    def reset_peak(self) -> None:
        self.peak = self.live
        self.device_peak = defaultdict(int, self.device_live)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _DataSets(TorchFunctionMode):
    """Sees `tensor.data = other`, which no dispatch mode does, for LiveBytes."""

    def __init__(self, counter: LiveBytes):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", None) == "__set__" and getattr(func, "__self__", None) is _DATA:
            self.counter._data_set(args[0])
        return out


_DATA = torch._C.TensorBase.__dict__["data"]
