"""The one saved-tensor hook of a run, and the count of bytes it keeps where.

Only the innermost `saved_tensors_hooks` context runs, so two offloaders nested would silently switch one
off. Here one dispatcher decides for every tensor autograd saves:

1. a streamed layer's weights (a Linear saves `weight.t()`, a view): the weight streamer's handle, fetched
   again in backward;
2. storages kept as they are: parameters on the device (under FSDP2, the running layer's gathered ones),
   RoPE's cos/sin (shared by every layer), and tensors computed from parameters alone (Gemma's norm saves
   `1 + weight`: one value per feature, no token in it, so not an activation of a chunk);
3. storages the layer runtime stashed itself (the layer input chunk, the attention output): a reference to
   that copy, never a second one;
4. inside a scope opened by the layer runtime: the scope's place — kept on the device, or copied to a tier by
   the stash — once per storage (views of one storage share it); in a recompute scope: kept and counted.
   An fp32 tensor that is the upcast of a bf16/fp16 one (transformers' RMSNorm computes in fp32 and saves
   the upcast) is kept as the half-size original and cast again when backward unpacks it, bit for bit; the
   upcast of the stashed layer input costs nothing at all;
5. anything else (embeddings, the head, the loss): kept as autograd would.

`Residency` counts the bytes of saved activations on the device (kept, staging, prefetch, recompute) and in
each tier, with their peaks: the runtime's own measurement, compared against the plan's prediction.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Optional

import torch

from .live_bytes import holds_no_data
from .stash import DEVICE, ActivationStash, SavedRef

DEVICE_KINDS = ("kept", "staging", "prefetch", "recompute")


def _from_parameters_alone(t: torch.Tensor, depth: int = 4) -> bool:
    """t's autograd history reaches only parameters, in at most `depth` steps (`1 + weight`, `weight.float()`)."""
    if t.grad_fn is None:
        return False
    stack = [(t.grad_fn, 0)]
    while stack:
        fn, d = stack.pop()
        if fn is None:
            continue
        if hasattr(fn, "variable"):  # AccumulateGrad: a leaf
            if not isinstance(fn.variable, torch.nn.Parameter):
                return False
            continue
        if d >= depth:
            return False
        stack.extend((f, d + 1) for f, _ in fn.next_functions)
    return True


def storage_key(t: torch.Tensor) -> int:
    """Which storage t is a view of: its address, or, for a tensor that holds no data (meta, and the fake host
    tensors of a dry run, whose addresses are all 0), the storage object's own identity."""
    storage = t.untyped_storage()
    return storage._cdata if holds_no_data(t) else storage.data_ptr()


class Residency:
    """Bytes of saved activations now, and their peaks: on the device by kind, and per tier."""

    def __init__(self):
        self.now: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self.device_peak = 0
        self.phase_peaks: dict[str, int] = {}  # position ("head", "backward 3") -> device bytes peak there
        self._phase: Optional[str] = None

    @property
    def device(self) -> int:
        return sum(self.now[k] for k in DEVICE_KINDS)

    def add(self, kind: str, n: int) -> None:
        self.now[kind] += n
        self.peak[kind] = max(self.peak[kind], self.now[kind])
        if kind in DEVICE_KINDS:
            total = self.device
            self.device_peak = max(self.device_peak, total)
            if self._phase is not None:
                self.phase_peaks[self._phase] = max(self.phase_peaks.get(self._phase, 0), total)

    def sub(self, kind: str, n: int) -> None:
        self.now[kind] -= n

    def phase(self, name: Optional[str]) -> None:
        """From now on, device peaks also count toward `name` (None: no phase)."""
        self._phase = name
        if name is not None:
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.device)

    def reset_peaks(self) -> None:
        self.peak = defaultdict(int, self.now)
        self.device_peak = self.device
        self.phase_peaks = {}


class _Scope:
    __slots__ = ("layer", "cls", "place", "recompute", "seen", "hold", "counted")

    def __init__(self, layer: int, cls: str, place: str, recompute: bool):
        self.layer, self.cls, self.place, self.recompute = layer, cls, place, recompute
        self.seen: dict[int, object] = {}  # storage address -> Stored (or bytes counted, in recompute)
        self.hold: list[torch.Tensor] = []  # sources stay alive in the scope, so no address is reused
        self.counted = 0


class SavedTensorDispatcher:
    def __init__(self, stash: Optional[ActivationStash] = None, residency: Optional[Residency] = None):
        self.stash = stash
        self.residency = residency or Residency()
        self.passthrough: set[int] = set()
        self.aliases: dict[int, object] = {}  # storage address -> Stored
        self.params = None  # the weight streamer (pack_param / unpack_param), when weights are streamed
        self.half_dtype: Optional[torch.dtype] = None  # the activations' bf16/fp16 dtype, if any (see _upcast_source)
        self._scope: Optional[_Scope] = None
        self.kept_by_layer: dict[int, int] = defaultdict(int)
        self.class_bytes: dict[tuple[int, str], int] = defaultdict(int)  # (layer, class) -> bytes stashed, this step
        self.staged_by_layer: dict[int, int] = defaultdict(int)
        self.tier_by_layer: dict[tuple[int, str], int] = defaultdict(int)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @contextlib.contextmanager
    def scope(self, layer: int, cls: str, place: str, recompute: bool = False):
        """Tensors saved (or stashed) inside belong to class `cls` of `layer` and go to `place`; recompute:
        kept, and counted while the scope's graph lives."""
        outer, self._scope = self._scope, _Scope(layer, cls, place, recompute)
        scope = self._scope
        try:
            yield scope
        finally:
            self._scope = outer
            if not recompute and self.stash is not None and place != DEVICE:
                self.stash.flush(layer)
            scope.hold.clear()

    def count_recomputed(self, scope: _Scope, outputs) -> None:
        """A recompute's outputs (a pre chunk's q, k, v: the graph's ends, which no saved-tensor hook sees) are
        recompute memory too, until the scope is released, as the plan's recompute chunk counts them."""
        for t in outputs:
            self._count_recomputed(scope, t, storage_key(t))

    def _count_recomputed(self, scope: _Scope, t: torch.Tensor, ptr: int) -> None:
        if ptr not in scope.seen:
            n = t.untyped_storage().nbytes()
            scope.seen[ptr] = n
            scope.counted += n
            self.residency.add("recompute", n)

    def release_recompute(self, scope: _Scope) -> None:
        """A recompute scope's tensors are gone (its graph was freed)."""
        self.residency.sub("recompute", scope.counted)
        scope.counted = 0

    # --- stashing ---------------------------------------------------------------------------------
    def stash_tensor(self, t: torch.Tensor) -> SavedRef:
        """Keep t (a tensor the layer runtime needs in backward) at the current scope's place."""
        scope = self._scope
        ptr = storage_key(t)
        stored = self.aliases.get(ptr) or scope.seen.get(ptr)
        if stored is None:
            stored = self._put(scope, t)
            scope.seen[ptr] = stored
        return SavedRef(stored, t)

    def _put(self, scope: _Scope, t: torch.Tensor):
        stored = self.stash.put(scope.layer, scope.place, t)
        scope.hold.append(t)
        n = stored.nbytes
        self.class_bytes[scope.layer, scope.cls] += n
        if stored.place == DEVICE:
            self.kept_by_layer[scope.layer] += n
            self.residency.add("kept", n)
        else:
            self.staged_by_layer[scope.layer] += n
            self.tier_by_layer[scope.layer, stored.place] += n
            self.residency.add("staging", n)
            self.residency.add(stored.place, n)
        return stored

    def release_layer(self, layer: int) -> None:
        """Layer `layer`'s backward is done: its kept storages, its prefetch buffer and its tier copies are free."""
        self.residency.sub("kept", self.kept_by_layer.pop(layer, 0))
        for key in [k for k in self.tier_by_layer if k[0] == layer]:
            self.residency.sub(key[1], self.tier_by_layer.pop(key))

    def drained(self, layer: int) -> None:
        """Layer `layer`'s staging buffer has reached its tier."""
        self.residency.sub("staging", self.staged_by_layer.pop(layer, 0))

    # --- the hooks --------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor):
        if self.params is not None:  # first: a streamed layer's buffer is the weights of the layer running now
            handle = self.params.pack_param(t)
            if handle is not None:
                return _ParamHandle(handle)
        ptr = storage_key(t)
        if ptr in self.passthrough:
            return t
        stored = self.aliases.get(ptr)
        if stored is not None:
            return SavedRef(stored, t)
        scope = self._scope
        if scope is None:
            return t
        if not scope.recompute:
            upcast = self._upcast(scope, t, ptr)
            if upcast is not None:
                return upcast
        if scope.recompute:
            self._count_recomputed(scope, t, ptr)
            return t
        if _from_parameters_alone(t):
            return t
        return self.stash_tensor(t)

    def _upcast(self, scope: _Scope, t: torch.Tensor, ptr: int):
        """t as the half-precision tensor it was upcast from (see the module doc), or None."""
        seen = scope.seen.get(ptr)
        if isinstance(seen, _Upcast):
            return seen
        source = _upcast_source(t, self.half_dtype)
        if source is None:
            return None
        if isinstance(source, torch.Tensor):  # a leaf: the layer input chunk, stashed already
            stored = self.aliases.get(storage_key(source))
            if stored is None:
                return None
            ref = SavedRef(stored, source)
        else:
            ref = self.stash_tensor(t.to(source))
        scope.seen[ptr] = result = _Upcast(ref, t.dtype)
        scope.hold.append(t)  # alive until the scope ends: its address must not be reused by another tensor
        return result

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if isinstance(packed, SavedRef):
            return packed.tensor()
        if isinstance(packed, _Upcast):
            return packed.ref.tensor().to(packed.dtype)
        return self.params.unpack_param(packed.handle)


_HALF = (torch.bfloat16, torch.float16)


def _upcast_source(t: torch.Tensor, half_dtype: Optional[torch.dtype] = None):
    """For an fp32 tensor made by casting a bf16/fp16 one: that leaf tensor, or the dtype it was cast from.

    The dtype comes from the producing node's metadata (`_input_metadata`, not a public API); where a torch
    lacks it, from `half_dtype` (the model's or autocast's half dtype): an fp32 ToCopy output in these graphs
    can only come from the activations' half dtype (`.to(float32)` of an fp32 tensor makes no node)."""
    fn = t.grad_fn
    if fn is None or t.dtype != torch.float32 or type(fn).__name__ != "ToCopyBackward0":
        return None
    node, output_nr = fn.next_functions[0]
    if node is None:
        return None
    leaf = getattr(node, "variable", None)  # AccumulateGrad: the cast read a leaf
    if leaf is not None:
        return leaf if leaf.dtype in _HALF else None
    try:
        meta = node._input_metadata  # what the producing op returned (its dtype)
        dtype = meta[output_nr].dtype if output_nr < len(meta) else None
    except (AttributeError, RuntimeError):
        dtype = half_dtype
    return dtype if dtype in _HALF else None


class _Upcast:
    __slots__ = ("ref", "dtype")

    def __init__(self, ref: SavedRef, dtype: torch.dtype):
        self.ref, self.dtype = ref, dtype


class _ParamHandle:
    __slots__ = ("handle",)

    def __init__(self, handle):
        self.handle = handle
