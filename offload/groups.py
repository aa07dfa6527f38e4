"""A model's parameters cut into the units that move together: one group per decoder layer, plus the rest.

Offloading works a layer at a time (a layer's optimizer step starts when its
gradients are complete; a layer's weights are fetched one layer ahead), so
both the optimizer and the parameter streamer see the model as these groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longtune.models.layers import decoder_layers


@dataclass
class ParamGroup:
    index: int  # forward order: 0 = the rest (embeddings, final norm, head), 1.. = decoder layers
    name: str
    module: nn.Module  # whose forward first uses these weights: the gate for their update
    params: list[nn.Parameter]
    names: list[str]
    shapes: list[torch.Size]  # taken at grouping: a streamed parameter's own shape is empty while it is away

    @property
    def numel(self) -> int:
        return sum(s.numel() for s in self.shapes)


def param_groups(model: nn.Module) -> list[ParamGroup]:
    """Trainable parameters by decoder layer; a parameter shared by several modules (tied embeddings) appears once."""
    layers = decoder_layers(model)
    owner: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            owner.setdefault(id(p), i + 1)
    groups = [ParamGroup(0, "rest", model, [], [], [])] + [ParamGroup(i + 1, f"layer {i}", m, [], [], []) for i, m in enumerate(layers)]
    for name, p in model.named_parameters():  # named_parameters() yields a tied parameter once
        if p.requires_grad:
            g = groups[owner.get(id(p), 0)]
            g.params.append(p)
            g.names.append(name)
            g.shapes.append(p.shape)
    return [g for g in groups if g.params]


def decay_groups(params: list[nn.Parameter], weight_decay: float, drop_empty: bool = True, **extra) -> list[dict]:
    """AdamW's two torch param groups, as every longtune optimizer makes them (so checkpoints move between them):
    decay on matrices, none on norms and biases (1-D), in that order; `extra` goes into both."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, **extra},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"] or not drop_empty]


def flat_offsets(shapes: list[torch.Size]) -> list[int]:
    """Element offsets of each tensor in one flat buffer, in order."""
    offsets, at = [], 0
    for shape in shapes:
        offsets.append(at)
        at += shape.numel()
    return offsets
