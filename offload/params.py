"""Decoder-layer weights that live on the host or NVMe and visit the GPU one layer ahead of use.

ZeRO-Infinity's parameter offload for one process. Each layer's weights are
one flat buffer in their home (a `HostPool` slot, or an `NvmeStore` key); on
the GPU a layer exists only from its prefetch to the end of its use:

- forward: layer i's pre-hook waits for i and prefetches i+1; its post-hook
  frees i (the last layer stays: backward starts there);
- backward: autograd would keep freed weights alive through the tensors it
  saved (linear saves `weight.t()`, a view), so the memory runtime's saved-tensor
  dispatcher packs saved views of streamed weights as (layer, view geometry)
  (`pack_param`) and rebuilds them on unpack after fetching the layer again,
  prefetching the one below (`unpack_param`);
  recomputation under gradient checkpointing fetches through the pre-hook;
- a layer is freed in backward once all its gradients are accumulated.

Embeddings, the final norm and the head stay on the GPU. The optimizer writes
updated weights into the home (`write`), and a fetch waits for that update.

The copies go through the memory runtime's host-to-device `Mover` (one owner of the copy streams): compute
waits for a fetched layer on the device, the host never does. The host waits only where it reuses what a
copy reads: the NVMe staging buffer before the next read into it, and a layer's home before the optimizer
writes its update there (on a GPU the host runs layers ahead of the copies).
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future
from typing import Callable, Optional

import torch
from torch import nn

from .dispatch import storage_key
from .hooks import HookSet
from .groups import ParamGroup, param_groups
from .movers import Mover, Ticket, worker_pool
from .pinned import HostPool, exact_pinned_empty
from .stash import storage_view

ALIGN = 64  # bytes: every weight starts aligned for any dtype view


def _in_backward() -> bool:
    return torch._C._current_autograd_node() is not None


class ParamStreamer:
    def __init__(self, model: nn.Module, device: torch.device, *, tier: str = "cpu", nvme_store=None,
                 numa_nodes=None, interleave: bool = False, numa_local_share: Optional[float] = None,
                 mover: Optional[Mover] = None, hooks: Optional[HookSet] = None):
        if tier not in ("cpu", "nvme"):
            raise ValueError(f"parameter tier must be cpu or nvme, not {tier!r}")
        if tier == "nvme" and nvme_store is None:
            raise ValueError("the nvme parameter tier needs an NvmeStore")
        self.device, self.tier, self.store = torch.device(device), tier, nvme_store
        groups = param_groups(model)
        self.layers = [g for g in groups if g.index > 0]
        streamed = {id(p) for g in self.layers for p in g.params}
        self._layout: dict[int, list[tuple[int, int]]] = {}  # layer -> (byte offset, nbytes) per param
        self._nbytes: dict[int, int] = {}
        for g in self.layers:
            at, spans = 0, []
            for p in g.params:
                spans.append((at, p.numel() * p.element_size()))  # params are all there at construction
                at += -(-spans[-1][1] // ALIGN) * ALIGN
            self._layout[g.index], self._nbytes[g.index] = spans, at
        self.pool = HostPool([(f"w/{g.index}", (self._nbytes[g.index],), torch.uint8) for g in self.layers],
                             numa_nodes=numa_nodes, interleave=interleave, numa_local_share=numa_local_share,
                             name="params") if tier == "cpu" else None
        biggest = max(self._nbytes.values())
        self._staging = exact_pinned_empty((biggest,), torch.uint8) if tier == "nvme" else None
        self._write_staging = exact_pinned_empty((biggest,), torch.uint8) if tier == "nvme" else None
        with torch.no_grad():
            for g in self.layers:  # move each layer to its home; frees it from the model as it goes
                flat = self._home(g) if tier == "cpu" else self._write_staging[: self._nbytes[g.index]]
                for p, view in zip(g.params, self._views(flat, g)):
                    view.copy_(p.data)
                    p.data = self._placeholder(p)
                if tier == "nvme":
                    self.store.write(self._key(g), flat)
        for name, p in model.named_parameters():
            if id(p) not in streamed:
                p.data = p.data.to(self.device)
        for name, b in model.named_buffers():
            b.data = b.data.to(self.device)
        # The memory runtime's host-to-device mover (one owner of the copy streams); a private one when alone.
        self._own_mover = mover is None
        self.mover = Mover(self.device, "params-h2d") if mover is None else mover
        self._from_staging: Optional[Ticket] = None  # nvme: the last copy out of the staging buffer
        self._from_home: dict[int, Ticket] = {}  # cpu: layer -> the last copy out of its home
        self._fetcher = worker_pool("fetch")
        self._fetches: dict[int, Future] = {}  # layer -> (device buffer, its copy's ticket)
        self._resident: dict[int, torch.Tensor] = {}  # layer -> its device buffer
        self._storage_layer: dict[int, int] = {}  # device buffer storage address -> layer
        self._by_index = {g.index: g for g in self.layers}
        self._last = self.layers[-1].index
        self._grads_left: dict[int, int] = {}
        self.wait_update: Callable[[int], None] = lambda index: None  # the optimizer's gate, set by the trainer
        self.bytes_fetched = 0
        self.wait_s = 0.0  # the training thread blocked on a fetch: transfer time not hidden behind compute
        # The memory runtime's HookSet (offload/hooks.py: after the optimizer's callbacks), or one of its own.
        self._hooks = hooks if hooks is not None else HookSet()
        for g in self.layers:
            self._hooks.before_forward(g.module, "streamer", lambda i=g.index: self.before_forward(i))
            self._hooks.after_forward(g.module, "streamer", lambda out, i=g.index: self.after_forward(i, out))
            for p in g.params:
                self._hooks.on_grad(p, "streamer", self._grad_hook(g))
        if hooks is None:
            self._hooks.install()

    # --- homes -------------------------------------------------------------------------------
    def _key(self, g: ParamGroup) -> str:
        return f"weights-{g.index}"

    def _home(self, g: ParamGroup) -> torch.Tensor:
        return self.pool.tensor(f"w/{g.index}")

    def _views(self, flat: torch.Tensor, g: ParamGroup) -> list[torch.Tensor]:
        return [flat[o: o + n].view(p.dtype).view(shape) for (o, n), p, shape in zip(self._layout[g.index], g.params, g.shapes)]

    def _placeholder(self, p: nn.Parameter) -> torch.Tensor:
        return torch.empty(0, dtype=p.dtype, device=self.device)

    def read(self, p: nn.Parameter) -> torch.Tensor:
        """The current weights of a streamed parameter, on the host (for the optimizer's master copy)."""
        g = next(g for g in self.layers if any(q is p for q in g.params))
        flat = self._home(g) if self.tier == "cpu" else self._read_home(g)
        return self._views(flat, g)[next(i for i, q in enumerate(g.params) if q is p)]

    def _read_home(self, g: ParamGroup) -> torch.Tensor:
        flat = torch.empty(self._nbytes[g.index], dtype=torch.uint8)
        self.store.read(self._key(g), flat)
        return flat

    def write(self, g: ParamGroup, masters: list[torch.Tensor]) -> None:
        """The optimizer's updated fp32 weights of layer g, into its home (runs on the optimizer's worker)."""
        if self.tier == "cpu":
            self.mover.finish(self._from_home.pop(g.index, None))  # the device has read the old weights
        flat = self._home(g) if self.tier == "cpu" else self._write_staging[: self._nbytes[g.index]]
        for view, m in zip(self._views(flat, g), masters):
            view.copy_(m)
        if self.tier == "nvme":
            self.store.write(self._key(g), flat)

    def writers(self) -> dict[int, Callable]:
        writer = _Writer(self)
        return {g.index: writer for g in self.layers}

    # --- fetch and free ----------------------------------------------------------------------
    def _fetch(self, g: ParamGroup) -> tuple[torch.Tensor, Ticket]:
        """On the fetcher thread: the layer's bytes read (NVMe) and their copy to the device enqueued."""
        self.wait_update(g.index)
        n = self._nbytes[g.index]
        if self.tier == "nvme":
            self.mover.finish(self._from_staging)  # the device has read the staging buffer's last layer
            source = self._staging[:n]
            self.store.read(self._key(g), source)
        else:
            source = self._home(g)
        # Allocated on the compute stream, which owns it; the mover orders its copy after compute's work so far
        # (a freed block compute was still using) and records the copy stream's use of it.
        buffer = torch.empty(n, dtype=torch.uint8, device=self.device)
        ticket = self.mover.copy(buffer, source)
        if self.tier == "nvme":
            self._from_staging = ticket
        else:
            self._from_home[g.index] = ticket
        self.bytes_fetched += n
        return buffer, ticket

    def prefetch(self, index: int) -> None:
        g = self._by_index.get(index)
        if g is not None and index not in self._resident and index not in self._fetches:
            self._fetches[index] = self._fetcher.submit(self._fetch, g)

    def ensure(self, index: int) -> None:
        """Layer `index`'s weights on the device, bound to its parameters."""
        if index in self._resident:
            return
        self.prefetch(index)
        start = time.perf_counter()
        buffer, ticket = self._fetches.pop(index).result()  # the copy is enqueued (NVMe: its read is done)
        self.wait_s += time.perf_counter() - start
        self.mover.wait(ticket)  # compute waits for the copy on the device; the host goes on
        g = self._by_index[index]
        for p, view in zip(g.params, self._views(buffer, g)):
            p.data = view
        self._resident[index] = buffer
        self._storage_layer[storage_key(buffer)] = index

    def release(self, index: int) -> None:
        buffer = self._resident.pop(index, None)
        if buffer is None:
            return
        del self._storage_layer[storage_key(buffer)]
        for p in self._by_index[index].params:
            p.data = self._placeholder(p)

    def before_forward(self, index: int) -> None:
        """Layer `index` is about to run: its weights on the device, the next layer's on their way."""
        backward = _in_backward()  # recomputation under gradient checkpointing
        self.ensure(index)
        self.prefetch(index - 1 if backward else index + 1)

    def after_forward(self, index: int, output) -> None:
        """Layer `index` ran: free its weights, unless backward starts with it or this was a recomputation."""
        if _in_backward():
            return  # recomputed for backward: freed once its gradients are in
        out = output if isinstance(output, torch.Tensor) else next((o for o in output if isinstance(o, torch.Tensor)), None)
        if out is not None and out.requires_grad:
            # The gradient of the layer's output arrives just before the layer's backward (and before
            # gradient checkpointing recomputes it, which calls forward with no hooks): fetch it then.
            out.register_hook(self._backward_prefetch(index))
        if index == self._last and torch.is_grad_enabled():
            self._grads_left = {h.index: len(h.params) for h in self.layers}
            return  # backward starts with the last layer
        self.release(index)

    def _backward_prefetch(self, index: int):
        def hook(grad):
            self.ensure(index)
            self.prefetch(index - 1)
        return hook

    def _grad_hook(self, g: ParamGroup):
        def hook(p):
            left = self._grads_left.get(g.index, 0) - 1
            self._grads_left[g.index] = left
            if left == 0:
                self.release(g.index)
        return hook

    # --- saved tensors (called by the memory runtime's one saved-tensor dispatcher) -----------------
    def pack_param(self, t: torch.Tensor):
        """A handle for a view of a streamed layer's weights (None for anything else)."""
        layer = self._storage_layer.get(storage_key(t)) if t.device == self.device else None
        if layer is None:
            return None
        return (layer, t.dtype, t.size(), t.stride(), t.storage_offset())

    def unpack_param(self, packed):
        layer, dtype, size, stride, offset = packed
        self.ensure(layer)
        self.prefetch(layer - 1)
        return storage_view(self._resident[layer], dtype, size, stride, offset)

    @contextlib.contextmanager
    def materialized(self):
        """Every streamed parameter as its own host tensor (safetensors refuses views of one buffer)
        for a checkpoint save or load; what they hold afterwards is written home."""
        for index in list(self._resident):
            self.release(index)
        for g in self.layers:
            flat = self._home(g) if self.tier == "cpu" else self._read_home(g)
            for p, view in zip(g.params, self._views(flat, g)):
                p.data = view.clone()
        try:
            yield
        finally:
            for g in self.layers:
                flat = self._home(g) if self.tier == "cpu" else self._write_staging[: self._nbytes[g.index]]
                for p, view in zip(g.params, self._views(flat, g)):
                    view.copy_(p.data)
                    p.data = self._placeholder(p)
                if self.tier == "nvme":
                    self.store.write(self._key(g), flat)

    def close(self) -> None:
        self._hooks.remove()
        self._fetcher.shutdown(wait=True)
        if self._own_mover:
            self.mover.close()
        if self.pool is not None:
            self.pool.close()


class _Writer:
    """What the optimizer calls for a streamed layer: write the update home; read the weights."""

    def __init__(self, streamer: ParamStreamer):
        self.streamer = streamer

    def __call__(self, g: ParamGroup, masters: list[torch.Tensor]) -> None:
        self.streamer.write(g, masters)

    def read(self, p: nn.Parameter) -> torch.Tensor:
        return self.streamer.read(p)
