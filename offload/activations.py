"""The activation runtime: carries out a plan's per-layer, per-class, per-token-chunk decisions inside autograd.

For each decoder layer the plan names, per class and per token chunk, a place: "gpu" (keep), a tier ("host",
"cxl", "nvme": offload) or "recompute". The classes are the planner's (planner/inventory.py):

  input  the layer's input chunk (what any recompute starts from)
  pre    the pre-attention part's saved tensors and its outputs q/k/v (models/layers.LayerSplit.pre)
  attn   the attention output and its logsumexp, whole (never recomputed: attention is quadratic)
  post   the post-attention part's saved tensors (o_proj, residual, norm, MLP)

A layer runs as one autograd Function. Forward, chunk by chunk: stash the input chunk; run the pre part with
autograd on (inside a dispatcher scope that sends its saved tensors to the chunk's place) or, for a chunk to
be recomputed, under no_grad; its keys and values join the layer's K/V; the attention of the chunk's queries
against the keys so far (per document, offload/attention.py, in key blocks merged by their logsumexps), stashed
whole at the attention class's place; then the post part of the chunk, likewise. Only the gradient edges of each
chunk's small graph are kept (its leaves' data is dropped), so what stays alive is exactly what was stashed, and
of all tokens only the input, the output and K/V at once.

Backward is one sweep over the chunks, last first: the post part's backward (recomputing the chunk if the
plan says so) gives the chunk's attention-output gradient; the attention backward of that query chunk
(keys of all tokens, from the stash or recomputed without a graph) gives dq and adds to dk/dv; chunk i's
dk/dv are complete once chunk i is done, so the pre part's backward (recomputed if need be) follows at once.
One recomputed chunk is alive at a time. Parameter gradients of the chunks are summed in fp32 and handed to
autograd once per layer and micro-batch, so gradient hooks (the offloaded optimizer) see one gradient each.

Sequence parallel (ulysses.py): the layer holds this rank's shard of the sequence; attention runs over the group
(all-to-all to the head layout and back). A query of this rank's first chunk may see every key of an earlier
rank's shard, so the forward runs every chunk's pre part first, then chunk by chunk the attention and the post
part (every rank taking its chunk i together). The backward keeps the chunk order, but a key's gradient is final
only when every rank's queries are done, so the pre parts follow in a second pass.

Prefetch: when layer l's backward starts it waits for its own offloaded bytes and starts bringing back those
of layer l - depth; the last layers' prefetch starts when the forward ends (behind the LM head). Depth 0 holds
one layer's buffers in all: a layer's copies out end with its forward, and its bytes come back when its backward
starts (the plan prices those copies as not hidden).

One full-length gradient per layer: a chunk's output gradient is read by that chunk's backward alone, so the
input gradient is written over it, chunk by chunk, where the output gradient is one the runtime made itself (the
gradient it handed autograd for the layer above, or the final norm's: the runtime runs the final norm too, its
backward chunk by chunk). A gradient autograd made elsewhere may be shared (an add hands one tensor to both its
inputs): that one is never written.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from longtune.models.layers import check_supported, decoder, decoder_layers, split_layer
from longtune.models.patch import loss_writes_over_hidden
from longtune.planner.plan import CLASSES, RECOMPUTE

from .attention import attention_backward_chunk, attention_forward_chunk, documents, forward_key_block
from .dispatch import SavedTensorDispatcher, storage_key
from .stash import DEVICE, ActivationStash
from .ulysses import (SequenceGroup, attention_backward_shard, gradient_sums, keys_values_from_heads,
                      keys_values_to_heads, ulysses_forward_chunk)


def chunk_bounds(tokens: int, chunks: int) -> list[tuple[int, int]]:
    """[start, end) of each of `chunks` near-equal token chunks, none over planner.problem.chunk_tokens."""
    return [(i * tokens // chunks, (i + 1) * tokens // chunks) for i in range(chunks)]


@dataclass
class _Graph:
    """A chunk's autograd graph, held by its gradient edges only."""

    outs: list
    ins: list
    refs: list = field(default_factory=list)  # stashed outputs (pre: q, k, v)


@dataclass
class _LayerState:
    index: int
    bounds: list[tuple[int, int]]
    docs: list
    cos: torch.Tensor
    sin: torch.Tensor
    autocast: tuple
    shape: tuple
    dtype: torch.dtype  # the layer input's
    inputs: list = field(default_factory=list)  # SavedRef per chunk
    pre: list = field(default_factory=list)  # _Graph or None (recompute) per chunk
    post: list = field(default_factory=list)
    out: list = field(default_factory=list)  # SavedRef per chunk of the attention output, [b, t, nq, d] contiguous
    lse: list = field(default_factory=list)  # SavedRef per chunk of its logsumexp (sequence parallel: head layout)
    rope: set = field(default_factory=set)  # storages of cos/sin, kept as they are until the last backward
    params: list = field(default_factory=list)  # the layer's parameters as its forward saw them (see _layer_params)

    @property
    def attn_dtype(self) -> torch.dtype:
        """The dtype attention runs in: autocast's where it is on (SDPA under autocast casts q, k and v to it,
        so the plain model runs bf16 flash attention there), else the layer's."""
        enabled, dtype = self.autocast
        return dtype if enabled else self.dtype


class _LayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, runtime, index, cos, sin, *params):
        ctx.runtime = runtime
        ctx.state, y = runtime._forward(index, x, cos, sin, list(params))
        return y

    @staticmethod
    def backward(ctx, dy):
        dx, grads = ctx.runtime._backward(ctx.state, dy)
        ctx.state = None
        return (dx, None, None, None, None, *grads)


class _FinalNormFunction(torch.autograd.Function):
    """The decoder's final norm, its backward chunk by chunk (ActivationRuntime._norm_backward)."""

    @staticmethod
    def forward(ctx, x, runtime, *params):
        ctx.runtime, ctx.params = runtime, params
        ctx.save_for_backward(x)
        with torch.no_grad():
            out = runtime.base.norm(x)
        # The fused loss writes its gradient over the output (models/patch.py): its bytes are held (they are alive
        # until this backward anyway) so that a gradient coming back in them is known as the output's own
        ctx.out = out.detach() if runtime.loss_writes_over_hidden else None
        return out

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx, grads = ctx.runtime._norm_backward(x, dy, list(ctx.params), ctx.out)
        ctx.out = None
        return (dx, None, *grads)


class ActivationRuntime:
    """Patches a model's decoder stack to run `places` (see `plan_places`) with `stash` and `dispatcher`.

    places[l][cls] is the list of places of layer l's chunks of class cls (one entry for "attn").
    """

    def __init__(self, model: nn.Module, places: list[dict[str, list[str]]], dispatcher: SavedTensorDispatcher,
                 stash: ActivationStash, depth: int = 1, sequence: Optional[SequenceGroup] = None):
        self.model, self.places, self.dispatcher, self.stash = model, places, dispatcher, stash
        # Sequence parallel: this rank holds a shard of each sequence and attention runs over the group (ulysses.py)
        self.sequence = sequence if sequence is not None and sequence.size > 1 else None
        self.depth = max(0, depth)
        self.base = decoder(model)
        check_supported(self.base.config, 0)
        self.layers = list(decoder_layers(model))
        if len(places) != len(self.layers):
            raise ValueError(f"the plan decides {len(places)} layers, the model has {len(self.layers)}")
        self.splits = [split_layer(layer, self.base.config) for layer in self.layers]
        self._prefetch_bytes: dict[int, int] = {}  # layer -> bytes its prefetch brought back
        # time spent recomputing dropped chunks, by part (CUDA: measured by events, read lazily)
        self.recompute_s = {"pre": 0.0, "post": 0.0}
        self._recompute_events: list = []
        self._step: Optional[dict] = None  # the running forward: cos/sin, documents
        self._handed: Optional[weakref.ref] = None  # the last input gradient the runtime gave autograd
        self.loss_writes_over_hidden = loss_writes_over_hidden(model)
        self._originals = [(self.base, self.base.forward)] + [(layer, layer.forward) for layer in self.layers]
        self.base.forward = self._base_forward(self.base.forward)
        for i, layer in enumerate(self.layers):
            layer.forward = self._layer_forward(i, layer.forward)

    def close(self) -> None:
        for module, forward in self._originals:
            module.forward = forward

    # --- patching ---------------------------------------------------------------------------------
    def _base_forward(self, original):
        base = self.base

        def forward(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None, **kwargs):
            if not (torch.is_grad_enabled() and base.training) or use_cache:
                return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
            from transformers.modeling_outputs import BaseModelOutputWithPast

            if attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError("the activation runtime takes no padding mask: pack documents (position_ids restart "
                                 "at each document) instead")
            hidden = base.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            b, s = hidden.shape[:2]
            check_supported(base.config, s)
            if position_ids is None:
                position_ids = torch.arange(s, device=hidden.device).unsqueeze(0)
            cos, sin = base.rotary_emb(hidden, position_ids=position_ids)
            if self.sequence is None:
                docs = documents(position_ids, s, b)
            elif self.sequence.docs is None:
                raise RuntimeError("sequence parallel: the documents of the whole sequence were not gathered")
            else:
                docs = self.sequence.docs
            self._step = {"cos": cos, "sin": sin, "docs": docs}
            d = self.dispatcher
            rope = {storage_key(cos), storage_key(sin)}
            d.passthrough |= rope  # shared by every layer: kept as they are
            self._step["rope"] = rope
            try:
                for layer in self.layers:
                    hidden = layer(hidden, position_embeddings=(cos, sin))
            finally:
                self._step = None
            norm_params = [p for p in base.norm.parameters() if p.requires_grad]
            return BaseModelOutputWithPast(last_hidden_state=_FinalNormFunction.apply(hidden, self, *norm_params))

        return forward

    def _layer_forward(self, index: int, original):
        def forward(hidden_states, *args, position_embeddings=None, **kwargs):
            if self._step is None or not torch.is_grad_enabled():
                return original(hidden_states, *args, position_embeddings=position_embeddings, **kwargs)
            cos, sin = position_embeddings
            return _LayerFunction.apply(hidden_states, self, index, cos, sin, *_layer_params(self.layers[index]))

        return forward

    # --- forward ----------------------------------------------------------------------------------
    def _forward(self, l: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, params: list):
        places, d, stash = self.places[l], self.dispatcher, self.stash
        b, s, h = x.shape
        chunks = len(places["input"])
        if chunks > s:
            raise ValueError(f"the plan cuts {s} tokens into {chunks} chunks")
        autocast = _autocast_state(x.device.type)
        d.half_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else (autocast[1] if autocast[0] else None)
        st = _LayerState(l, chunk_bounds(s, chunks), self._step["docs"], cos, sin, autocast, (b, s, h), x.dtype)
        st.rope, st.params = self._step["rope"], params
        weights = _storages(params) - d.passthrough
        d.passthrough |= weights
        stash.begin_forward(l)
        leaves: list[torch.Tensor] = []
        aliases: list[int] = []
        with d.hooks():
            if self.sequence is None:
                y = self._forward_by_chunk(st, x, params, places, leaves, aliases)
            else:
                y = self._forward_sequence_parallel(st, x, params, places, leaves, aliases)
        for ptr in aliases:
            d.aliases.pop(ptr, None)
        d.passthrough -= weights
        for leaf in leaves:  # the graphs' AccumulateGrad nodes hold their leaves: keep none of their bytes
            leaf.data = leaf.data.new_empty(0)
        stash.end_forward(l)
        if self.depth == 0:  # one layer's buffers in all: the next layer's staging may be these bytes
            self._drained(l)
        elif l >= 1:
            self._drained(l - 1)
        if l == len(self.layers) - 1:  # the forward is over: the first prefetches hide behind the head
            self.dispatcher.residency.phase("head")
            for j in range(l, l - self.depth, -1):
                if j >= 0:
                    self._prefetch(j)
        return st, y

    def _stash_input(self, st: _LayerState, x: torch.Tensor, i: int, place: str, aliases: list) -> torch.Tensor:
        """Chunk i of the layer input, stashed at `place` (a copy, unless one chunk is the whole input)."""
        d, (a, e) = self.dispatcher, st.bounds[i]
        x_i = x[:, a:e].clone() if len(st.bounds) > 1 else x
        with d.scope(st.index, "input", place):
            ref = d.stash_tensor(x_i)
        st.inputs.append(ref)
        aliases.append(storage_key(x_i))
        d.aliases[aliases[-1]] = ref.stored  # a pre/post graph saving the input refers to this copy
        return x_i

    def _input_again(self, st: _LayerState, x: torch.Tensor, i: int, aliases: list) -> torch.Tensor:
        """Chunk i of the layer input once more, as the stash's copy of it (a graph saving it refers to that): the
        kept copy itself, or a new copy of the same values where it went to a tier."""
        d, (a, e), ref = self.dispatcher, st.bounds[i], st.inputs[i]
        if len(st.bounds) == 1:
            x_i = x
        elif ref.stored.place == DEVICE:
            x_i = ref.tensor()
        else:
            x_i = x[:, a:e].clone()
        aliases.append(storage_key(x_i))
        d.aliases[aliases[-1]] = ref.stored
        return x_i

    def _pre(self, st: _LayerState, x_i: torch.Tensor, i: int, place: str, leaves: list):
        """Chunk i's pre part: q, k, v [b, t, heads, d], its graph kept (at `place`) or dropped (recompute)."""
        split, d, (a, e) = self.splits[st.index], self.dispatcher, st.bounds[i]
        if place == RECOMPUTE:
            with torch.no_grad():
                q, k, v = split.pre(x_i, st.cos[:, a:e], st.sin[:, a:e])
            st.pre.append(None)
            return q, k, v
        leaf = x_i.detach().requires_grad_()
        with d.scope(st.index, "pre", place), torch.enable_grad():
            q, k, v = split.pre(leaf, st.cos[:, a:e], st.sin[:, a:e])
            refs = [d.stash_tensor(t.detach()) for t in (q, k, v)]
        st.pre.append(_Graph([get_gradient_edge(t) for t in (q, k, v)], [get_gradient_edge(leaf)], refs))
        leaves.append(leaf)
        return q, k, v

    def _post(self, st: _LayerState, x_i: torch.Tensor, attn_i: torch.Tensor, i: int, place: str, leaves: list
              ) -> torch.Tensor:
        """Chunk i's post part on its input and attention output [b, t, nq * d]: its output, graph kept or dropped."""
        split, d = self.splits[st.index], self.dispatcher
        if place == RECOMPUTE:
            with torch.no_grad():
                y_i = split.post(x_i, attn_i)
            st.post.append(None)
            return y_i
        xl, al = x_i.detach().requires_grad_(), attn_i.detach().requires_grad_()
        with d.scope(st.index, "post", place), torch.enable_grad():
            y_i = split.post(xl, al)
        st.post.append(_Graph([get_gradient_edge(y_i)], [get_gradient_edge(xl), get_gradient_edge(al)]))
        leaves += [xl, al]
        return y_i.detach()

    def _forward_by_chunk(self, st: _LayerState, x: torch.Tensor, params: list, places: dict, leaves: list,
                          aliases: list) -> torch.Tensor:
        """The layer, one token chunk at a time: pre part, attention of the chunk's queries against the keys so far
        (offload/attention.attention_forward_chunk), post part. Of all tokens only the input, the output and K, V
        are alive at once; a chunk's q, attention output and input copy go (to their places) when it is done."""
        split, d = self.splits[st.index], self.dispatcher
        b, s, h = st.shape
        nq, nkv, hd = split.num_heads, split.num_kv_heads, split.head_dim
        kbuf, vbuf = (x.new_empty(b, s, nkv, hd, dtype=st.attn_dtype) for _ in range(2))
        y = x.new_empty(b, s, h)
        key_block = max(e - a for a, e in st.bounds)
        for i, (a, e) in enumerate(st.bounds):
            x_i = self._stash_input(st, x, i, places["input"][i], aliases)
            q, k, v = self._pre(st, x_i, i, places["pre"][i], leaves)
            kbuf[:, a:e], vbuf[:, a:e] = k.transpose(1, 2), v.transpose(1, 2)
            del k, v
            q = q.to(st.attn_dtype)
            out, lse = attention_forward_chunk(q, kbuf.transpose(1, 2), vbuf.transpose(1, 2), st.docs, a, e,
                                               split.scale, forward_key_block(q, key_block))
            del q
            out = out.transpose(1, 2)  # [b, t, nq, d], contiguous
            with d.scope(st.index, "attn", places["attn"][0]):
                st.out.append(d.stash_tensor(out))
                st.lse.append(d.stash_tensor(lse))
            aliases.append(storage_key(out))
            d.aliases[aliases[-1]] = st.out[-1].stored  # the post graph's saved attention output is this one
            y[:, a:e] = self._post(st, x_i, out.view(b, e - a, nq * hd), i, places["post"][i], leaves)
            # The chunk's input copy and attention output may be freed now (offloaded), and their addresses reused:
            # an alias is a storage address, so it must not outlive the chunk.
            while aliases:
                d.aliases.pop(aliases.pop(), None)
            del x_i, out, lse
        return y

    def _forward_sequence_parallel(self, st: _LayerState, x: torch.Tensor, params: list, places: dict, leaves: list,
                                   aliases: list) -> torch.Tensor:
        """The layer under sequence parallelism, in two passes over the chunks: every chunk's pre part (a query of
        this rank's last chunk needs the keys of every earlier rank's whole shard), K and V to the head layout once,
        then chunk by chunk the attention of its queries over the group (offload/ulysses.ulysses_forward_chunk) and
        its post part. Of all tokens only the input, the output, q and K/V are alive at once."""
        split, d, seq = self.splits[st.index], self.dispatcher, self.sequence
        b, s, h = st.shape
        nq, nkv, hd = split.num_heads, split.num_kv_heads, split.head_dim
        qbuf, kbuf, vbuf = (x.new_empty(b, s, n, hd, dtype=st.attn_dtype) for n in (nq, nkv, nkv))
        for i, (a, e) in enumerate(st.bounds):
            x_i = self._stash_input(st, x, i, places["input"][i], aliases)
            q, k, v = self._pre(st, x_i, i, places["pre"][i], leaves)
            qbuf[:, a:e], kbuf[:, a:e], vbuf[:, a:e] = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            del x_i, q, k, v
            while aliases:  # (addresses, which a freed input copy gives back)
                d.aliases.pop(aliases.pop(), None)
        kh, vh = keys_values_to_heads(kbuf, vbuf, seq)
        del kbuf, vbuf
        y = x.new_empty(b, s, h)
        key_block = max(e - a for a, e in st.bounds)
        for i, (a, e) in enumerate(st.bounds):
            out, lse = ulysses_forward_chunk(qbuf[:, a:e], kh, vh, st.docs, (a, e), s, split.scale, seq,
                                             forward_key_block(qbuf, key_block))
            with d.scope(st.index, "attn", places["attn"][0]):
                st.out.append(d.stash_tensor(out))
                st.lse.append(d.stash_tensor(lse))
            aliases.append(storage_key(out))
            d.aliases[aliases[-1]] = st.out[-1].stored
            x_i = self._input_again(st, x, i, aliases)
            y[:, a:e] = self._post(st, x_i, out.view(b, e - a, nq * hd), i, places["post"][i], leaves)
            while aliases:
                d.aliases.pop(aliases.pop(), None)
            del x_i, out, lse
        return y

    def _drained(self, l: int) -> None:
        self.stash.drain(l)
        self.dispatcher.drained(l)

    def _prefetch(self, l: int) -> None:
        if l < 0 or l in self._prefetch_bytes:
            return
        before = self.stash.bytes_to_device
        self.stash.prefetch(l)
        self._prefetch_bytes[l] = self.stash.bytes_to_device - before
        self.dispatcher.residency.add("prefetch", self._prefetch_bytes[l])

    @contextlib.contextmanager
    def _timed(self, part: str):
        """Time a recompute of `part` (pre, post): wall time on the CPU; CUDA events on a GPU (read at the step's
        end, no sync here)."""
        if self.stash.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._recompute_events.append((part, start, end))
        else:
            t = time.perf_counter()
            yield
            self.recompute_s[part] += time.perf_counter() - t

    def take_recompute_s(self) -> dict[str, float]:
        """Seconds spent recomputing since the last call, by part ({"pre": s, "post": s})."""
        for part, start, end in self._recompute_events:
            end.synchronize()
            self.recompute_s[part] += start.elapsed_time(end) / 1e3
        self._recompute_events = []
        out, self.recompute_s = self.recompute_s, dict.fromkeys(self.recompute_s, 0.0)
        return out

    # --- backward ---------------------------------------------------------------------------------
    def _own(self, dy: torch.Tensor) -> bool:
        """Whether `dy` is the gradient the runtime last handed autograd (which passes it on to the one node that
        made that input): its bytes are the runtime's to write over."""
        return self._handed is not None and self._handed() is dy

    def _hand_over(self, dx: torch.Tensor) -> torch.Tensor:
        self._handed = weakref.ref(dx)
        return dx

    def _norm_backward(self, x: torch.Tensor, dy: torch.Tensor, params: list, out: Optional[torch.Tensor]):
        """The final norm's backward, recomputed a chunk (the last layer's chunks) at a time: a chunk's temporaries
        (fp32 in a bf16 model) instead of the whole sequence's; its weight gradient summed in fp32 and cast. The
        input gradient goes over the output gradient where that lies in the norm's own output (`out`), which the
        fused loss wrote it over."""
        sums: list[Optional[torch.Tensor]] = [None] * len(params)
        own = (out is not None and dy.is_contiguous() and dy.shape == x.shape and storage_key(dy) == storage_key(out)
               and dy.storage_offset() == out.storage_offset())
        dx = dy if own else torch.empty_like(x)
        norm = self.base.norm
        for a, e in chunk_bounds(x.shape[1], len(self.places[-1]["input"])):
            xl = x[:, a:e].detach().requires_grad_()
            with torch.enable_grad():
                y = norm(xl)
            grads = torch.autograd.grad(y, [xl, *params], dy[:, a:e], allow_unused=True)
            dx[:, a:e] = grads[0]
            _accumulate(sums, grads[1:])
            del y, grads
        return self._hand_over(dx), _as_params(sums, params)

    def _backward(self, st: _LayerState, dy: torch.Tensor):
        l, d, stash = st.index, self.dispatcher, self.stash
        if l == len(self.layers) - 1:
            self._drained(l)
        d.residency.phase(f"backward {l}")
        self._prefetch(l)  # (a no-op unless nobody asked for it yet)
        self._prefetch(l - self.depth)
        stash.ready(l)
        params = st.params
        param_edges = [get_gradient_edge(p) for p in params]
        sums: list[Optional[torch.Tensor]] = [None] * len(params)
        autocast = torch.autocast(dy.device.type, dtype=st.autocast[1]) if st.autocast[0] else contextlib.nullcontext()
        # the input gradient goes over the output gradient where that is the runtime's own (see the module doc)
        dx = dy if self._own(dy) and dy.is_contiguous() else torch.empty_like(dy, memory_format=torch.contiguous_format)
        dy = dy.contiguous()
        # Every stashed storage on the device now (kept or prefetched) is not recompute memory.
        resident = {storage_key(ref.stored.device) for ref in st.inputs + st.out}
        resident |= _storages(params)  # a recompute saves the weights: they are not recompute memory
        resident -= d.passthrough
        d.passthrough |= resident
        try:
            with d.hooks(), autocast:
                sweep = self._sweep if self.sequence is None else self._sweep_sequence
                sweep(st, dy, dx, param_edges, sums)
        finally:
            d.passthrough -= resident
        stash.release(l)
        d.release_layer(l)
        d.residency.sub("prefetch", self._prefetch_bytes.pop(l, 0))
        if l == 0:
            d.passthrough -= st.rope
            d.residency.phase(None)
        return self._hand_over(dx), _as_params(sums, params)

    def _sweep(self, st: _LayerState, dy: torch.Tensor, dx: torch.Tensor, param_edges: list, sums: list) -> None:
        """The backward of one layer, chunk by chunk from the last: post, attention of the chunk's queries, pre.
        Writes the input gradient into dx (which may be dy: chunk i's output gradient is read in step i alone)."""
        l, split, d = st.index, self.splits[st.index], self.dispatcher
        b, s, h = st.shape
        nq, nkv, hd = split.num_heads, split.num_kv_heads, split.head_dim
        K, V = self._keys_values(st)
        acc = torch.float32 if dy.dtype in (torch.bfloat16, torch.float16) else dy.dtype
        dk = torch.zeros(b, nkv, s, hd, dtype=acc, device=dy.device)
        dv = torch.zeros_like(dk)
        key_block = max(e - a for a, e in st.bounds)
        for i in reversed(range(len(st.bounds))):
            a, e = st.bounds[i]
            cos_i, sin_i = st.cos[:, a:e], st.sin[:, a:e]
            dx_i, dattn = self._post_backward(st, i, dy, param_edges, sums)
            # attention backward of query chunk i
            graph, scope = st.pre[i], None
            if graph is None:
                xl = st.inputs[i].tensor().detach().requires_grad_()
                with d.scope(l, "pre", DEVICE, recompute=True) as scope, torch.enable_grad(), self._timed("pre"):
                    q, k, v = split.pre(xl, cos_i, sin_i)
                d.count_recomputed(scope, (q, k, v))
                outs, ins = [q, k, v], [xl]
            else:
                q = graph.refs[0].tensor()
                outs, ins = graph.outs, graph.ins
            dout = dattn.view(b, e - a, nq, hd).transpose(1, 2)
            out_i = st.out[i].tensor().transpose(1, 2)
            dq = attention_backward_chunk(dout, q.to(st.attn_dtype), K, V, out_i, st.lse[i].tensor(), st.docs, a, e,
                                          split.scale, dk, dv, key_block)
            del q, dout, dattn
            grads = torch.autograd.grad(outs, ins + param_edges,
                                        _as_outputs([dq, dk[:, :, a:e], dv[:, :, a:e]], outs, graph), allow_unused=True)
            del outs, ins
            st.pre[i] = None
            if scope is not None:
                d.release_recompute(scope)
            dx[:, a:e] = dx_i + grads[0]
            _accumulate(sums, grads[1:])

    def _post_backward(self, st: _LayerState, i: int, dy: torch.Tensor, param_edges: list, sums: list):
        """Chunk i's post part backward (recomputed if the plan dropped it): (its dx share, its attention output
        gradient [b, t, nq * d])."""
        l, split, d = st.index, self.splits[st.index], self.dispatcher
        a, e = st.bounds[i]
        b, nq, hd = st.shape[0], split.num_heads, split.head_dim
        graph, scope = st.post[i], None
        if graph is None:
            xl = st.inputs[i].tensor().detach().requires_grad_()
            al = st.out[i].tensor().view(b, e - a, nq * hd).detach().requires_grad_()
            with d.scope(l, "post", DEVICE, recompute=True) as scope, torch.enable_grad(), self._timed("post"):
                outs, ins = [split.post(xl, al)], [xl, al]
        else:
            outs, ins = graph.outs, graph.ins
        grads = torch.autograd.grad(outs, ins + param_edges, [dy[:, a:e]], allow_unused=True)
        del outs, ins
        st.post[i] = None
        if scope is not None:
            d.release_recompute(scope)
        _accumulate(sums, grads[2:])
        return grads[0], grads[1]

    def _sweep_sequence(self, st: _LayerState, dy: torch.Tensor, dx: torch.Tensor, param_edges: list, sums: list
                        ) -> None:
        """The backward of one layer under sequence parallelism, chunk by chunk from the last like `_sweep`; every
        rank of the group takes its chunk i together. K and V go to the head layout once; each chunk's post part
        gives its output gradient, whose attention backward (an all-to-all there and back) gives its dq. A key's
        gradient is final only when every rank's queries are done, so the pre parts follow in a second pass."""
        l, split, d, seq = st.index, self.splits[st.index], self.dispatcher, self.sequence
        b, s, h = st.shape
        nq, hd = split.num_heads, split.head_dim
        key_block = max(e - a for a, e in st.bounds)
        k, v = self._kv_tokens(st)
        kh, vh = keys_values_to_heads(k, v, seq)
        del k, v
        dkh, dvh = gradient_sums(kh)
        dq = dy.new_empty(b, s, nq, hd)
        for i in reversed(range(len(st.bounds))):
            a, e = st.bounds[i]
            dx[:, a:e], dattn = self._post_backward(st, i, dy, param_edges, sums)
            graph = st.pre[i]
            if graph is None:
                with torch.no_grad(), self._timed("pre"):
                    q = split.pre(st.inputs[i].tensor(), st.cos[:, a:e], st.sin[:, a:e])[0]
            else:
                q = graph.refs[0].tensor()
            dq[:, a:e] = attention_backward_shard(dattn.view(b, e - a, nq, hd), q.transpose(1, 2).to(st.attn_dtype),
                                                  st.out[i].tensor(), kh, vh, st.lse[i].tensor(), st.docs, (a, e),
                                                  s, split.scale, seq, dkh, dvh, key_block)
            del q, dattn
        del kh, vh
        kv_sums = [dkh, dvh]
        del dkh, dvh  # (each goes as it is cast back: keys_values_from_heads)
        dk, dv = keys_values_from_heads(kv_sums, split.num_kv_heads, dy.dtype, seq)
        for i in reversed(range(len(st.bounds))):
            a, e = st.bounds[i]
            graph, scope = st.pre[i], None
            if graph is None:
                xl = st.inputs[i].tensor().detach().requires_grad_()
                with d.scope(l, "pre", DEVICE, recompute=True) as scope, torch.enable_grad(), self._timed("pre"):
                    outs, ins = list(split.pre(xl, st.cos[:, a:e], st.sin[:, a:e])), [xl]
                d.count_recomputed(scope, outs)
            else:
                outs, ins = graph.outs, graph.ins
            grads = torch.autograd.grad(outs, ins + param_edges,
                                        _as_outputs([t[:, a:e].transpose(1, 2) for t in (dq, dk, dv)], outs, graph),
                                        allow_unused=True)
            del outs, ins
            st.pre[i] = None
            if scope is not None:
                d.release_recompute(scope)
            dx[:, a:e] += grads[0]
            _accumulate(sums, grads[1:])

    def _keys_values(self, st: _LayerState):
        """K and V of every token for the attention backward, [b, nkv, s, d]."""
        k, v = self._kv_tokens(st)
        return k.transpose(1, 2), v.transpose(1, 2)

    def _kv_tokens(self, st: _LayerState):
        """K and V of every token of the layer, token-major [b, s, nkv, d]: stashed, or recomputed without a
        graph."""
        split = self.splits[st.index]
        b, s, _ = st.shape
        kbuf = torch.empty(b, s, split.num_kv_heads, split.head_dim, dtype=st.out[0].dtype, device=st.cos.device)
        vbuf = torch.empty_like(kbuf)
        for i, (a, e) in enumerate(st.bounds):
            graph = st.pre[i]
            if graph is None:
                with torch.no_grad(), self._timed("pre"):
                    k, v = split.keys_values(st.inputs[i].tensor(), st.cos[:, a:e], st.sin[:, a:e])
            else:
                k, v = graph.refs[1].tensor(), graph.refs[2].tensor()
            kbuf[:, a:e], vbuf[:, a:e] = k.transpose(1, 2), v.transpose(1, 2)
        return kbuf, vbuf


def _as_outputs(grads: list[torch.Tensor], outs: list, graph: Optional[_Graph]) -> list[torch.Tensor]:
    """Gradients of q, k, v in their own dtypes (attention may run in autocast's dtype, and q, k, v come out of
    RoPE in another: the cast back is what autograd does through SDPA's autocast cast). `outs` are tensors
    (recomputed) or the gradient edges of `graph`, whose stashed outputs say their dtypes."""
    dtypes = [r.dtype for r in graph.refs] if graph is not None else [o.dtype for o in outs]
    return [g.to(dtype) for g, dtype in zip(grads, dtypes)]


def _layer_params(layer: nn.Module) -> list[torch.Tensor]:
    """The parameters the layer computes with now. Under FSDP2 these are the unsharded ones its pre-forward hook
    just gathered (and its pre-backward hook gathers again into the same tensors), not the shards registered
    when the runtime was built; elsewhere they are the registered parameters themselves."""
    return [p for p in layer.parameters() if p.requires_grad]


def _autocast_state(device_type: str) -> tuple[bool, Optional[torch.dtype]]:
    """(on, dtype) of autocast for this device; the meta device of a dry run has no autocast."""
    if device_type == "meta":
        return False, None
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _storages(tensors) -> set[int]:
    """Storage addresses of `tensors`: weights autograd saves are kept as they are, never stashed or counted."""
    return {storage_key(t) for t in tensors if t.numel()}


def _accumulate(sums: list, grads) -> None:
    for j, g in enumerate(grads):
        if g is None:
            continue
        if sums[j] is None:
            sums[j] = g.float() if g.dtype != torch.float32 else g
        else:
            sums[j] += g


def _as_params(sums: list, params: list) -> list:
    """The fp32 gradient sums cast to their parameters' dtypes, as autograd hands them on (None where unused)."""
    return [g.to(p.dtype) if g is not None else None for g, p in zip(sums, params)]


def plan_places(layers: list[dict[str, dict[str, int]]], tier_order: tuple[str, ...] = ("host", "cxl", "nvme")
                ) -> list[dict[str, list[str]]]:
    """A plan's chunk counts per place -> the place of each chunk: kept first, then the tiers, then recompute."""
    order = [DEVICE, *tier_order]
    out = []
    for layer in layers:
        row = {}
        for cls in CLASSES:
            counts = layer[cls]
            places = [p for p in order if counts.get(p)] + sorted(p for p in counts if p not in order and p != RECOMPUTE)
            row[cls] = [p for p in places for _ in range(counts[p])] + [RECOMPUTE] * counts.get(RECOMPUTE, 0)
        if len(set(row["attn"])) != 1:
            raise ValueError(f"the attention output goes to one place, got {layer['attn']}")
        row["attn"] = row["attn"][:1]
        out.append(row)
    return out
