"""Sequence parallelism (`parallel.sequence_parallel: P`): each sequence is cut into P contiguous shards, one per
rank of a sequence group, and attention runs over the group Ulysses-style (offload/ulysses.py).

    sp = SequenceParallel.build(cfg, ranks)     # the groups: ranks g*P .. g*P + P - 1 share a sequence
    loader = DataLoader(..., sp.dp_rank, sp.dp_world)
    sp.apply(model)                             # the model's attention runs over the group
    batch = sp.shard(batch)                     # this rank's tokens, targets shifted on the whole sequence

Why nothing else changes: the ranks of a group hold the same weights and train on disjoint tokens, exactly as
data-parallel ranks do. The loss of every rank is its own target tokens' sum over the global target count
(trainer/train.py), and the strategy (DDP, FSDP2, DeepSpeed) sums the gradients of all world ranks, so the
result is the gradient of the global mean, whatever the split into data and sequence ranks. The sequence
groups only carry the attention's all-to-alls.

Two paths run the attention: the activation runtime's (memory.budget_gb or memory.plan set: its attention core
calls the all-to-alls itself, offload/activations.py), and for plain autograd (optionally with transformers'
gradient checkpointing) `UlyssesAttention`, registered as the model's attention implementation. Both take the
documents of the whole sequence, gathered from the position ids once per forward by a hook on the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from .config import Config, ConfigError
from .layout import ParallelLayout
from .data import Batch
from .ranks import Ranks

ATTENTION_NAME = "longtune_ulysses"


@dataclass
class SequenceParallel:
    size: int = 1  # P: ranks per sequence
    rank: int = 0  # this rank's shard
    dp_rank: int = 0  # which sequence group (the data-parallel rank: the loader's)
    dp_world: int = 1
    group: Optional[object] = None  # offload.ulysses.SequenceGroup, when P > 1
    hook: Optional[object] = None  # the documents' gather on the decoder (apply); remove() takes it off

    @staticmethod
    def build(cfg: Config, ranks: Ranks) -> "SequenceParallel":
        P = cfg.parallel.sequence_parallel
        if ranks.world % P:
            raise ConfigError(f"parallel.sequence_parallel={P} does not divide the {ranks.world} processes launched: "
                              f"launch a multiple of {P} (world = data parallel x sequence parallel)")
        layout = ParallelLayout.of(cfg, ranks.world, ranks.rank)
        if P == 1:
            return SequenceParallel(1, 0, layout.dp_rank, layout.dp_world)
        import torch.distributed as dist

        from longtune.offload.ulysses import SequenceGroup

        mine = None
        for g in range(ranks.world // P):  # every rank creates every group, in the same order
            members = list(range(g * P, (g + 1) * P))
            pg = dist.new_group(members)
            if ranks.rank in members:
                mine = pg
        return SequenceParallel(P, layout.sp_rank, layout.dp_rank, layout.dp_world,
                                SequenceGroup(P, layout.sp_rank, mine))

    def shard(self, batch: Batch) -> Batch:
        return batch if self.size == 1 else batch.shard(self.rank, self.size)

    def apply(self, model: nn.Module) -> None:
        """The model's attention runs over the sequence group; the documents are gathered before each forward."""
        if self.size == 1:
            return
        from transformers import AttentionInterface

        from longtune.models.layers import decoder, decoder_layers

        AttentionInterface.register(ATTENTION_NAME, _attention)
        for layer in decoder_layers(model):
            layer.self_attn._longtune_sequence = self.group
        model.set_attn_implementation(ATTENTION_NAME)
        group = self.group

        def gather(module, args, kwargs):
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                raise RuntimeError("sequence parallel: the model was called without position_ids (each rank holds a "
                                   "shard: positions cannot be inferred)")
            embeds = kwargs.get("inputs_embeds")
            ids = kwargs.get("input_ids") if embeds is None else embeds
            group.gather_documents(position_ids, ids.shape[0])

        self.hook = decoder(model).register_forward_pre_hook(gather, with_kwargs=True)

    def remove(self) -> None:
        """Take the documents' gather off the model (the attention implementation stays registered)."""
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


def _attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: q [b, nq, s, d], k/v [b, nkv, s, d] of this rank's tokens ->
    ([b, s, nq, d], None). The mask is not used: causality within documents comes from the gathered positions."""
    from longtune.offload.ulysses import UlyssesAttention

    if dropout:
        raise ValueError("sequence parallel attention has no dropout")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = UlyssesAttention.apply(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), float(scale),
                                 module._longtune_sequence)
    return out, None
