"""Where saved activations live between a layer's forward and its backward: the device, a host tier, or NVMe.

Every tensor autograd saves inside a planned layer (and every tensor the layer runtime keeps itself: the layer
input, q/k/v, the attention output) is stashed as one storage's bytes (`Stored`) plus the view geometry
(`SavedRef`), so views of one storage are moved once and rebuilt exactly.

- place "gpu": the storage stays where it is; the stash only counts it.
- a tier ("host", "cxl"): the bytes are copied into the layer's staging buffer on the device, then to the
  layer's region of that tier's host pool by the device-to-host mover; the source is free at once.
- "nvme": the same way into a small ring of host buffers, and from there into one file per layer once the
  layer's forward has finished.

A layer's offloaded bytes sit back to back per tier, so the prefetch of a layer is one host-to-device copy
per tier (after one NVMe read, issued a layer earlier) into the layer's prefetch buffer. Staging and
prefetch buffers are views into one device block, at the offsets of the plan's arena (planner/plan.Arena,
packed by planner/arena.py: staging.<l> lives through forwards l and l+1, prefetch.<l> from the backward of
l+depth to the end of the backward of l); host regions and the NVMe ring are sized once, from the plan
(Plan.layer_regions, Plan.nvme_ring_slots), at start-up.

A storage that does not fit the planned region (the plan under-counted) stays on the device, is counted
as unplanned, and a warning says by how much the plan was short.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

import torch

from longtune.planner.plan import GPU, NVME, Arena

from .live_bytes import holds_no_data
from .movers import Mover, Ticket, worker_pool
from .pinned import HostPool

ALIGN = 64  # bytes: every stored storage starts aligned for any dtype view
DEVICE = GPU  # the place "gpu": kept on the device


def _round_up(n: int, k: int = ALIGN) -> int:
    return -(-n // k) * k


def storage_view(t: torch.Tensor, dtype: torch.dtype, size, stride, offset: int) -> torch.Tensor:
    """A `dtype` tensor over t's storage with this geometry (`offset` in `dtype` elements), no copy."""
    storage = t.untyped_storage()
    if not holds_no_data(t):
        return torch.empty(0, dtype=dtype, device=t.device).set_(storage, offset, size, stride)
    # A dry run's fake tensors cannot set_ a storage: the same view, made from t
    whole = t.as_strided((storage.nbytes() // t.element_size(),), (1,), 0).view(torch.uint8)
    return whole.view(dtype).as_strided(size, stride, offset)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The whole storage of t as a flat uint8 tensor (no copy)."""
    return storage_view(t, torch.uint8, (t.untyped_storage().nbytes(),), (1,), 0)


class Stored:
    """One storage's bytes: on the device (kept or prefetched) and/or in a tier region (offloaded)."""

    __slots__ = ("layer", "place", "nbytes", "offset", "device", "host")

    def __init__(self, layer: int, place: str, nbytes: int, offset: int = 0):
        self.layer, self.place, self.nbytes, self.offset = layer, place, nbytes, offset
        self.device: Optional[torch.Tensor] = None  # uint8 on the device, when resident
        self.host: Optional[torch.Tensor] = None  # uint8 in the tier region


class SavedRef:
    """A saved tensor: a Stored storage and the view of it autograd (or the layer runtime) asked for."""

    __slots__ = ("stored", "dtype", "size", "stride", "offset")

    def __init__(self, stored: Stored, t: torch.Tensor):
        self.stored, self.dtype = stored, t.dtype
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()

    def tensor(self) -> torch.Tensor:
        buf = self.stored.device
        if buf is None:
            raise RuntimeError(f"activation of layer {self.stored.layer} ({self.stored.place}) is not on the device: "
                               "its prefetch was not issued or waited for")
        item = self.dtype.itemsize
        start = buf.storage_offset()  # bytes into the storage (a uint8 view)
        return storage_view(buf, self.dtype, self.size, self.stride, start // item + self.offset)


@dataclass
class _Region:
    """The bytes of one layer sent to one tier: a host buffer filled front to back, and where the layer's
    staging and prefetch buffers keep the same bytes on the device."""

    tier: str
    capacity: int
    base: int  # offset of this tier's part inside the layer's staging / prefetch buffer
    host: Optional[torch.Tensor] = None  # uint8; for nvme a ring buffer, bound when the layer starts
    used: int = 0
    flushed: int = 0
    d2h: Optional[Ticket] = None  # the last device-to-host copy of the region
    nvme_write: Optional[Future] = None
    items: list = field(default_factory=list)


class ActivationStash:
    """Device, host and NVMe homes of saved activations, per layer; see the module docstring.

    `layout[l]` is {tier: planned bytes} of layer l's offloaded activations (tiers "host", "cxl", "nvme":
    Plan.layer_regions()); `block` is the device block, `arena` the plan's Arena (its staging.<l> / prefetch.<l>
    offsets into the block); `ring_slots` how many host buffers NVMe activations pass through (Plan.nvme_ring_slots:
    the plan counts them in the host tier).
    """

    def __init__(self, device: torch.device, layout: list[dict[str, int]], block: torch.Tensor, arena: Arena,
                 d2h: Mover, h2d: Mover, host_pools: dict[str, HostPool], nvme_store=None, depth: int = 1,
                 ring_slots: int = 0):
        self.device, self.layout, self.block, self.arena = torch.device(device), layout, block, arena
        self.d2h, self.h2d, self.pools, self.store, self.depth = d2h, h2d, host_pools, nvme_store, max(1, depth)
        self.num_layers = len(layout)
        self.regions: list[dict[str, _Region]] = []
        for l, tiers in enumerate(layout):
            base, regions = 0, {}
            for tier, nbytes in tiers.items():
                regions[tier] = _Region(tier, nbytes, base)
                if tier != NVME:
                    regions[tier].host = host_pools[tier].tensor(f"act/{l}")
                base += nbytes
            self.regions.append(regions)
        ring_bytes = max((t.get(NVME, 0) for t in layout), default=0)
        self._ring = []
        if ring_bytes:
            if nvme_store is None:
                raise ValueError("the plan sends activations to nvme but no NVMe store was given")
            if ring_slots < 1:
                raise ValueError("the plan sends activations to nvme but sizes no ring for them")
            ring = HostPool([(f"ring/{i}", (ring_bytes,), torch.uint8) for i in range(ring_slots)], name="act-nvme-ring")
            self._ring_pool = ring
            self._ring = [ring.tensor(f"ring/{i}") for i in range(ring_slots)]
        self._ring_busy: list[Optional[Future]] = [None] * len(self._ring)  # host work on a slot: a write or read
        self._ring_h2d: list[Optional[Ticket]] = [None] * len(self._ring)  # the device's copy out of a slot
        self._io = worker_pool("act-io") if self._ring else None
        self._reads: dict[int, Future] = {}
        self._prefetch: dict[int, list[Ticket]] = {}
        self.unplanned_bytes = 0  # bytes that did not fit the planned regions and stayed on the device
        self.bytes_to_host = self.bytes_to_device = 0
        self.nvme_read = self.nvme_written = 0
        self._warned = False

    # --- forward ----------------------------------------------------------------------------------
    def begin_forward(self, l: int) -> None:
        """Before layer l's first stash: its staging buffer and NVMe ring slot must be free."""
        if l >= 2:  # staging.<l-2> (the same bytes, maybe) drained during forward l-1
            self.drain(l - 2)
        for region in self.regions[l].values():
            region.used = region.flushed = 0
            region.items = []
            if region.tier == NVME:
                region.host = self._claim_slot(l % len(self._ring))

    def put(self, l: int, place: str, t: torch.Tensor) -> Stored:
        """Stash the storage of t for layer l at `place`."""
        nbytes = t.untyped_storage().nbytes()
        if place == DEVICE:
            stored = Stored(l, DEVICE, nbytes)
            stored.device = byte_view(t)
            return stored
        region = self.regions[l].get(place)
        offset = region.used if region is not None else 0
        if region is None or offset + nbytes > region.capacity:
            return self._unplanned(l, place, t, nbytes, region)
        region.used = _round_up(offset + nbytes)
        stored = Stored(l, place, nbytes, offset)
        staging = self._staging(l, region, offset, nbytes)
        staging.copy_(byte_view(t))  # on the compute stream: the source may be freed right after
        stored.host = region.host[offset: offset + nbytes]
        region.items.append(stored)
        return stored

    def flush(self, l: int) -> None:
        """Start the device-to-host copies of what layer l stashed since the last flush (one per tier)."""
        for region in self.regions[l].values():
            if region.used > region.flushed:
                a, b = region.flushed, region.used
                self.bytes_to_host += b - a
                region.d2h = self.d2h.copy(region.host[a:b], self._staging(l, region, a, b - a), after=region.d2h)
                region.flushed = b

    def end_forward(self, l: int) -> None:
        """Layer l's forward is done: flush, and send its NVMe region to the drive once it is on the host."""
        self.flush(l)
        region = self.regions[l].get(NVME)
        if region is not None and region.used:
            slot, ticket, n = l % len(self._ring), region.d2h, region.used

            def write(region=region, ticket=ticket, n=n, l=l):
                self.d2h.finish(ticket)
                self.store.write(self._key(l), region.host[:n])
                self.nvme_written += n

            region.nvme_write = self._ring_busy[slot] = self._io.submit(write)

    def drain(self, l: int) -> None:
        """Block until layer l's staging buffer has been copied to its tiers (its lifetime ends)."""
        for region in self.regions[l].values():
            self.d2h.finish(region.d2h)

    # --- backward ---------------------------------------------------------------------------------
    def prefetch(self, l: int) -> None:
        """Start bringing layer l's offloaded bytes back into its prefetch buffer (NVMe: after its read)."""
        if l < 0 or l in self._prefetch:
            return
        tickets = []
        for region in self.regions[l].values():
            if not region.used:
                continue
            after = region.d2h  # the host copy must be complete (the last layers' copies may still run)
            if region.tier == NVME:
                read = self._reads.pop(l, None) or self._read(l)
                after = Ticket(future=read)
            dst = self._prefetch_view(l, region, 0, region.used)
            tickets.append(self.h2d.copy(dst, region.host[: region.used], after=after))
            if region.tier == NVME:
                self._ring_h2d[l % len(self._ring)] = tickets[-1]
            self.bytes_to_device += region.used
            for stored in region.items:
                stored.device = self._prefetch_view(l, region, stored.offset, stored.nbytes)
        self._prefetch[l] = tickets
        if l - 1 >= 0 and NVME in self.regions[l - 1] and self.regions[l - 1][NVME].used and l - 1 not in self._reads:
            self._reads[l - 1] = self._read(l - 1)  # one layer ahead of its prefetch

    def _read(self, l: int) -> Future:
        region = self.regions[l][NVME]
        slot, n = l % len(self._ring), region.used

        def read():
            if region.nvme_write is not None:
                region.nvme_write.result()
            self.store.read(self._key(l), region.host[:n])
            self.nvme_read += n

        region.host = self._claim_slot(slot)  # before the prefetch that reads it is enqueued
        future = self._io.submit(read)
        self._ring_busy[slot] = future
        return future

    def _claim_slot(self, slot: int) -> torch.Tensor:
        """A ring slot, once nothing reads or writes it any more: neither the host (the slot's last NVMe write
        or read) nor the device. On a GPU the host runs layers ahead of the device in backward, so the
        host-to-device copy out of the slot may still be queued behind compute: the host waits for it too."""
        if self._ring_busy[slot] is not None:
            self._ring_busy[slot].result()
        self.h2d.finish(self._ring_h2d[slot])
        self._ring_h2d[slot] = None
        return self._ring[slot]

    def ready(self, l: int) -> None:
        """Compute waits until layer l's prefetch has landed (prefetching it now if nobody did)."""
        if l not in self._prefetch:
            self.prefetch(l)
        for ticket in self._prefetch[l]:
            self.h2d.wait(ticket)

    def release(self, l: int) -> None:
        """Layer l's backward is done: its prefetch buffer and regions are free."""
        self._prefetch.pop(l, None)
        for region in self.regions[l].values():
            for stored in region.items:
                stored.device = None
            region.items = []
            region.used = region.flushed = 0

    def finish(self) -> None:
        """Wait for every copy and file operation in flight."""
        for regions in self.regions:
            for region in regions.values():
                self.d2h.finish(region.d2h)
                if region.nvme_write is not None:
                    region.nvme_write.result()
        for future in self._ring_busy:
            if future is not None:
                future.result()

    def close(self) -> None:
        try:
            self.finish()
        finally:
            if self._io is not None:
                self._io.shutdown(wait=True)
            if self.store is not None:
                for l in range(self.num_layers):
                    if self._key(l) in self.store:
                        self.store.delete(self._key(l))

    # --- helpers ----------------------------------------------------------------------------------
    def _key(self, l: int) -> str:
        return f"activations-{l}"

    def _staging(self, l: int, region: _Region, offset: int, nbytes: int) -> torch.Tensor:
        start = self.arena.staging(l) + region.base + offset
        return self.block[start: start + nbytes]

    def _prefetch_view(self, l: int, region: _Region, offset: int, nbytes: int) -> torch.Tensor:
        start = self.arena.prefetch(l) + region.base + offset
        return self.block[start: start + nbytes]

    def _unplanned(self, l: int, place: str, t: torch.Tensor, nbytes: int, region) -> Stored:
        self.unplanned_bytes += nbytes
        if not self._warned:
            have = region.capacity if region is not None else 0
            warnings.warn(f"layer {l}: the plan sized its {place} activations at {have:,} bytes, the layer saves more "
                          f"(+{nbytes:,} at least); the excess stays on the device and the plan's memory figures "
                          "are short by it", RuntimeWarning, stacklevel=3)
            self._warned = True
        stored = Stored(l, DEVICE, nbytes)
        stored.device = byte_view(t)
        return stored
