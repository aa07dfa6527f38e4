"""Bytes of the tensors allocated while a block of code runs, and their peak, on any device (meta included).

A `TorchDispatchMode` sees every op's outputs. A storage first seen as an op's output, and never before as an
input, was allocated inside the block: it is counted until the last tensor that refers to it (the output and
any view of it made since) is gone. Storages that were there before the block (its inputs, their views, what
an in-place op returns) are never counted. On the meta device nothing holds data, so this measures what a step
would allocate without running it: the planner's descriptions of transient buffers are checked against it.

What it cannot see: memory a kernel allocates for itself and frees before returning (FlashAttention's
backward accumulators, cuBLAS workspaces), the caching allocator's rounding and fragmentation.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0  # bytes of the storages allocated inside and alive now
        self.peak = 0
        self._storages: dict[int, list] = {}  # storage id -> [nbytes, weak references to its tensors]
        self._outside: dict[int, list] = {}  # storages that existed before (seen as inputs first) -> their tensors

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and _key(t) not in self._storages:
                self._refer(self._outside, _key(t), t)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        key = _key(t)
        if key in self._outside:
            self._refer(self._outside, key, t)
            return
        if key not in self._storages:
            self.live += t.untyped_storage().nbytes()
            self.peak = max(self.peak, self.live)
        self._refer(self._storages, key, t)

    def _refer(self, table: dict, key: int, t: torch.Tensor) -> None:
        """t refers to storage `key`; the entry goes (and a counted storage's bytes with it) with its last tensor.
        The storage's id may be reused once it is gone: the entry must not outlive it."""
        if key not in table:
            table[key] = [t.untyped_storage().nbytes() if table is self._storages else 0, []]
        table[key][1].append(weakref.ref(t, lambda ref: self._dropped(table, key, ref)))

    def _dropped(self, table: dict, key: int, ref) -> None:
        entry = table.get(key)
        if entry is None:
            return
        entry[1].remove(ref)
        if not entry[1]:
            del table[key]
            if table is self._storages:
                self.live -= entry[0]

    def reset_peak(self) -> None:
        self.peak = self.live


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata
