"""Ulysses sequence parallelism: attention over a sequence split across the ranks of a group.

Each of the P ranks of a sequence group holds a contiguous 1/P of every sequence's tokens. Everything in a
decoder layer but attention is token-wise, so it runs on the shard as it is. Attention needs every token:
an all-to-all turns the q/k/v of the rank's tokens for all heads into those of all tokens for 1/P of the
heads, attention runs there (offload/attention.py: causal within each document, exact), and a second
all-to-all turns the output back (DeepSpeed-Ulysses, Jacobs et al. 2023; ALST). The backward is the same
in reverse: the output gradient and q/k/v go to the head layout, the attention backward gives dq/dk/dv
there, and they come back to the tokens.

Fewer key/value heads than ranks (GQA): k and v are repeated to P heads before the all-to-all (each rank's
query heads all read one of them) and their gradients summed back; otherwise the key/value heads must
divide among the ranks like the query heads.

Two callers share these functions: the activation runtime's attention core (offload/activations.py), and
`UlyssesAttention`, the autograd Function the plain transformers path registers as the model's attention
(trainer/sequence_parallel.py). The documents (packed sequences) come from the position ids of the whole
sequence, gathered once per forward (`SequenceGroup.gather_documents`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .attention import Documents, attention_backward_chunk, attention_forward, attention_forward_chunk, documents


@dataclass
class SequenceGroup:
    """The ranks that share each sequence: `size` of them, this process being `rank` among them."""

    size: int
    rank: int
    group: object = None  # the torch.distributed ProcessGroup
    docs: Optional[Documents] = None  # the running forward's documents over the whole sequence

    def gather_documents(self, position_ids: torch.Tensor, batch: int) -> Documents:
        """The documents of the whole sequence from this rank's shard of the position ids ([b or 1, s])."""
        pos = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
        parts = [torch.empty_like(pos) for _ in range(self.size)]
        dist.all_gather(parts, pos.contiguous(), group=self.group)
        whole = torch.cat(parts, dim=1)
        self.docs = documents(whole, whole.shape[1], batch)
        return self.docs


# --- the two all-to-alls ----------------------------------------------------------------------------


def seq_to_heads(x: torch.Tensor, seq: SequenceGroup) -> torch.Tensor:
    """[b, s, n, d] of this rank's tokens, all heads -> [b, P*s, n/P, d] of all tokens, this rank's heads."""
    P = seq.size
    b, s, n, d = x.shape
    send = x.reshape(b, s, P, n // P, d).permute(2, 0, 1, 3, 4).contiguous()  # [dst rank, b, s, n/P, d]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=seq.group)  # [src rank = token shard, b, s, n/P, d]
    return recv.permute(1, 0, 2, 3, 4).reshape(b, P * s, n // P, d)


def heads_to_seq(y: torch.Tensor, seq: SequenceGroup) -> torch.Tensor:
    """The inverse of `seq_to_heads`: [b, P*s, n/P, d] -> [b, s, n, d] (contiguous)."""
    P = seq.size
    b, S, m, d = y.shape
    send = y.reshape(b, P, S // P, m, d).transpose(0, 1).contiguous()  # [dst rank = token shard, b, s, n/P, d]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=seq.group)  # [src rank = head group, b, s, n/P, d]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, S // P, P * m, d)


def _expand_kv(x: torch.Tensor, size: int) -> torch.Tensor:
    """[b, s, nkv, d] -> [b, s, max(nkv, size), d]: with fewer kv heads than ranks, kv head j serves ranks
    j*g .. j*g + g - 1 (g = size / nkv), as GQA maps their query heads to it."""
    nkv = x.shape[2]
    return x if nkv >= size else x.repeat_interleave(size // nkv, dim=2)


def _reduce_kv(dx: torch.Tensor, nkv: int) -> torch.Tensor:
    """The gradient of `_expand_kv`: sum each kv head's copies."""
    n = dx.shape[2]
    return dx if n == nkv else dx.unflatten(2, (nkv, n // nkv)).sum(3)


# --- attention ----------------------------------------------------------------------------------------


def ulysses_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents, scale: float,
                    seq: SequenceGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within each document of the whole sequence, for this rank's tokens.

    q [b, s, nq, d], k/v [b, s, nkv, d]: this rank's tokens, token-major (any strides). Returns ``(out, lse)``:
    out [b, s, nq, d] contiguous (this rank's tokens, all heads), lse [b, nq/P, P*s] in the head layout, as the
    backward takes it back."""
    qh = seq_to_heads(q, seq)
    kh, vh = keys_values_to_heads(k, v, seq)
    out, lse = attention_forward(qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2), docs, scale)
    del qh, kh, vh
    return heads_to_seq(out.transpose(1, 2), seq), lse


def ulysses_forward_chunk(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, docs: Documents, bound: tuple[int, int],
                          shard_len: int, scale: float, seq: SequenceGroup, key_block: Optional[int] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention of the queries [a, e) of every rank's shard (each rank passes its own, in step) against the
    keys so far (offload/attention.attention_forward_chunk), so no rank holds q or the output of all tokens in the
    head layout. q: this rank's [b, e - a, nq, d]; kh, vh: `keys_values_to_heads` of the whole sequence. Returns
    this rank's out [b, e - a, nq, d] (contiguous) and the chunk's lse in the head layout, [b, nq/P, P*(e - a)]:
    piece r (rank r's queries, global positions [r*s + a, r*s + e)) at [r*(e - a), (r+1)*(e - a)), as
    `attention_backward_shard` takes it back."""
    a, e = bound
    t, P = e - a, seq.size
    qh = seq_to_heads(q, seq)  # [b, P*t, nq/P, d]
    b, _, m, d = qh.shape
    oh = torch.empty_like(qh)
    lse = torch.empty(b, m, P * t, dtype=torch.float64 if qh.dtype == torch.float64 else torch.float32,
                      device=qh.device)
    K, V = kh.transpose(1, 2), vh.transpose(1, 2)
    for r in range(P):
        piece, lo = slice(r * t, (r + 1) * t), r * shard_len + a
        o, l = attention_forward_chunk(qh[:, piece].transpose(1, 2), K, V, docs, lo, lo + t, scale, key_block)
        oh[:, piece], lse[:, :, piece] = o.transpose(1, 2), l
        del o, l
    del qh
    return heads_to_seq(oh, seq).contiguous(), lse  # (one head per rank: the reordering is a view, not a copy)


def keys_values_to_heads(k: torch.Tensor, v: torch.Tensor, seq: SequenceGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of this rank's tokens [b, s, nkv, d] -> of all tokens for this rank's heads, [b, P*s, n, d]."""
    return tuple(seq_to_heads(_expand_kv(t, seq.size), seq) for t in (k, v))


def keys_values_from_heads(sums: list[torch.Tensor], num_kv_heads: int, dtype: torch.dtype, seq: SequenceGroup
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients `attention_backward_shard` summed in the head layout, `sums` = [dkh, dvh] ([b, n, P*s, d]) ->
    this rank's tokens, [b, s, nkv, d] in `dtype`. `sums` is emptied as they go: each sum (fp32 for bf16/fp16) is
    let go once cast, before its all-to-all, where the caller holds no other reference."""
    out = []
    while sums:
        t = sums.pop(0).to(dtype)
        out.append(_reduce_kv(heads_to_seq(t.transpose(1, 2), seq), num_kv_heads))
        del t
    return tuple(out)


def attention_backward_shard(dout: torch.Tensor, q: torch.Tensor, out: torch.Tensor, kh: torch.Tensor,
                             vh: torch.Tensor, lse: torch.Tensor, docs: Documents, bound: tuple[int, int],
                             shard_len: int, scale: float, seq: SequenceGroup, dkh: torch.Tensor, dvh: torch.Tensor,
                             key_block: Optional[int] = None) -> torch.Tensor:
    """The attention backward of the queries [a, e) of every rank's shard (each rank passes its own, in step):
    returns this rank's dq [b, e - a, nq, d] and adds into dkh, dvh ([b, n, P*s, d], the head layout's K and V
    gradient sums, fp32 for bf16/fp16).

    dout, q, out: this rank's tokens [a, e), [b, e - a, nq, d] (any strides); kh, vh: `keys_values_to_heads`;
    lse: the chunk's, in the head layout [b, nq/P, P*(e - a)] (`ulysses_forward_chunk`'s; for the whole shard as one
    chunk, `ulysses_forward`'s). In the head layout the chunk's queries are P pieces, rank r's at the global
    positions [r*s + a, r*s + e): each is a query chunk of offload/attention.py's blockwise-exact backward, its
    earlier keys in blocks of at most `key_block`. The K and V gradients are final once every chunk of every rank
    is done (a key gets gradient from every later query, whichever rank holds it)."""
    a, e = bound
    t, P = e - a, seq.size
    dh, qh, oh = (seq_to_heads(x, seq) for x in (dout, q, out))  # [b, P*t, nq/P, d]
    dqh = torch.empty_like(qh)
    K, V = kh.transpose(1, 2), vh.transpose(1, 2)
    for r in range(P):
        piece, lo = slice(r * t, (r + 1) * t), r * shard_len + a
        dqh[:, piece] = attention_backward_chunk(
            dh[:, piece].transpose(1, 2), qh[:, piece].transpose(1, 2), K, V, oh[:, piece].transpose(1, 2),
            lse[:, :, piece], docs, lo, lo + t, scale, dkh, dvh, key_block).transpose(1, 2)
    del dh, qh, oh
    return heads_to_seq(dqh, seq)


def gradient_sums(kh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed K and V gradient sums for `attention_backward_shard`: [b, n, P*s, d], fp32 for bf16/fp16."""
    acc = torch.float32 if kh.dtype in (torch.bfloat16, torch.float16) else kh.dtype
    dkh = torch.zeros(kh.transpose(1, 2).shape, dtype=acc, device=kh.device)
    return dkh, torch.zeros_like(dkh)


def ulysses_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, docs: Documents, scale: float, seq: SequenceGroup
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv ([b, s, n, d], this rank's tokens, q's dtype) of `ulysses_forward`, given its out and lse:
    the whole shard as one chunk."""
    kh, vh = keys_values_to_heads(k, v, seq)
    sums = list(gradient_sums(kh))
    s = q.shape[1]
    dq = attention_backward_shard(dout, q, out, kh, vh, lse, docs, (0, s), s, scale, seq, *sums)
    del kh, vh
    return (dq, *keys_values_from_heads(sums, k.shape[2], q.dtype, seq))


class UlyssesAttention(torch.autograd.Function):
    """`ulysses_forward` / `ulysses_backward` for autograd: the attention of the plain transformers path (and of
    transformers' gradient checkpointing, whose recompute runs it again in the backward)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, seq: SequenceGroup):
        if seq.docs is None:
            raise RuntimeError("sequence parallel attention called outside a forward of the model (no documents)")
        ctx.seq, ctx.scale, ctx.docs = seq, scale, seq.docs
        out, lse = ulysses_forward(q, k, v, seq.docs, scale, seq)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ulysses_backward(dout.contiguous(), q, k, v, out, lse, ctx.docs, ctx.scale, ctx.seq)
        return dq, dk, dv, None, None
