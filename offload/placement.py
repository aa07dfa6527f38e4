"""The CXL-aware placement policy: which NUMA nodes each offloaded tensor's memory goes to.

CXL memory appears on Linux as a NUMA node with memory and no CPUs. `place` follows
Liaw & Chen (2025): the fp32 optimizer tensors that the CPU Adam step reads hardest
stay in local DRAM; bf16 weights, checkpointed activations and bf16 grads go to CXL;
the tensor that straddles the local budget is interleaved over local + all CXL nodes.
A policy apart from the node discovery and syscalls in numa.py, which it only calls.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

from .numa import NumaNode, bind_memory, cxl_nodes, local_nodes


class TensorKind(str, Enum):
    # Declaration order is placement priority (Liaw & Chen 2025).
    FP32_MOMENTUM = "fp32_momentum"
    FP32_VARIANCE = "fp32_variance"
    FP32_MASTER_GRAD = "fp32_master_grad"
    FP32_MASTER_WEIGHT = "fp32_master_weight"
    BF16_WEIGHT = "bf16_weight"
    ACTIVATION = "activation"
    BF16_GRAD = "bf16_grad"


# The CPU Adam step streams these every step and runs ~4x slower on CXL for large tensors.
PREFERS_LOCAL = frozenset({TensorKind.FP32_MOMENTUM, TensorKind.FP32_VARIANCE,
                           TensorKind.FP32_MASTER_GRAD, TensorKind.FP32_MASTER_WEIGHT})


@dataclass(frozen=True)
class PlacementRequest:
    name: str
    nbytes: int
    kind: TensorKind


@dataclass(frozen=True)
class Placement:
    """Where one tensor goes. For an interleaved placement with local bytes, nodes[0] is the local node."""
    name: str
    nodes: tuple[int, ...]
    interleave: bool
    local_bytes: int
    cxl_bytes: int


class _Budget:
    def __init__(self, local_left: int, cxl: Sequence[NumaNode]):
        self.local_left = local_left
        self.cxl_left = {n.id: n.free_bytes for n in cxl}

    def cxl_room(self) -> int:
        # Striping puts an equal share on every card, so the fullest card bounds the room.
        return min(self.cxl_left.values()) * len(self.cxl_left) if self.cxl_left else 0

    def take(self, local: int, cxl: int) -> None:
        self.local_left -= local
        ids = sorted(self.cxl_left)
        for k, i in enumerate(ids):
            self.cxl_left[i] -= cxl // len(ids) + (k < cxl % len(ids))


def _place_one(req: PlacementRequest, local_id: int, budget: _Budget) -> Placement:
    cxl_ids = tuple(sorted(budget.cxl_left))
    size, room = req.nbytes, budget.cxl_room()

    def local() -> Placement:
        budget.take(size, 0)
        return Placement(req.name, (local_id,), False, size, 0)

    def on_cxl() -> Placement:
        budget.take(0, size)
        return Placement(req.name, cxl_ids, len(cxl_ids) > 1, 0, size)

    wants_local = req.kind in PREFERS_LOCAL or not cxl_ids
    if wants_local and size <= budget.local_left:
        return local()
    if not wants_local and size <= room:
        return on_cxl()
    if size <= budget.local_left:  # CXL is full: the local budget takes it whole
        return local()
    share = min(budget.local_left, size // (1 + len(cxl_ids)))
    share = max(share, size - room)  # CXL cannot take the rest: local DRAM takes more
    if not cxl_ids or share > budget.local_left:
        missing = share - budget.local_left
        raise ValueError(f"tensor {req.name!r} ({size} bytes) does not fit: {budget.local_left} bytes of local "
                         f"budget and {room} bytes of striped CXL room left, {missing} bytes missing")
    if share == 0:
        return on_cxl()
    budget.take(share, size - share)
    return Placement(req.name, (local_id, *cxl_ids), True, share, size - share)


def place(requests: Sequence[PlacementRequest], nodes: Sequence[NumaNode], local_budget_bytes: int,
          *, local_node: int | None = None) -> list[Placement]:
    """Greedy CXL-aware placement, in priority order; returns placements in request order.

    local_node: the node the GPU hangs off (default: the lowest-numbered node with CPUs).
    """
    if local_budget_bytes < 0:
        raise ValueError(f"local_budget_bytes must be >= 0, got {local_budget_bytes}")
    for r in requests:
        if not isinstance(r.kind, TensorKind) or r.nbytes < 0:
            raise ValueError(f"bad placement request {r!r}: needs nbytes >= 0 and a TensorKind")
    local_ids = [n.id for n in local_nodes(nodes)]
    if not local_ids:
        raise ValueError("place needs at least one NUMA node with CPUs (local DRAM); none given")
    if local_node is not None and local_node not in local_ids:
        raise ValueError(f"local_node {local_node} is not a node with CPUs (those are {local_ids})")
    budget = _Budget(local_budget_bytes, cxl_nodes(nodes))
    need = sum(r.nbytes for r in requests)
    have = local_budget_bytes + sum(budget.cxl_left.values())
    if need > have:
        raise ValueError(f"tensors need {need} bytes but the local budget ({local_budget_bytes}) plus CXL free "
                         f"bytes ({have - local_budget_bytes}) hold {have}: {need - have} bytes missing")
    priority = {kind: i for i, kind in enumerate(TensorKind)}
    order = sorted(range(len(requests)), key=lambda i: (priority[requests[i].kind], i))
    out: list[Placement | None] = [None] * len(requests)
    for i in order:
        out[i] = _place_one(requests[i], local_node if local_node is not None else local_ids[0], budget)
    return out  # type: ignore[return-value]


def placement_ranges(placement: Placement, nbytes: int) -> list[tuple[int, int, tuple[int, ...], bool]]:
    """(offset, length, nodes, interleave) pieces that give a buffer exactly the planned local share.

    MPOL_INTERLEAVE spreads pages evenly, so when the local share is below an even split the
    buffer is cut in two: the head interleaved over every node, the tail over the CXL nodes only.
    """
    page, k = mmap.PAGESIZE, len(placement.nodes)
    # Within a page per node of an even split, plain interleave already matches the plan.
    if not placement.interleave or placement.local_bytes == 0 or (placement.local_bytes + page) * k >= nbytes:
        return [(0, nbytes, placement.nodes, placement.interleave)]
    head = placement.local_bytes * k // page * page
    cxl = placement.nodes[1:]
    pieces = [(0, head, placement.nodes, True)] if head else []
    return pieces + [(head, nbytes - head, cxl, len(cxl) > 1)]


def bind_placement(addr: int, nbytes: int, placement: Placement, strict: bool = False) -> None:
    """Apply a Placement to the page-aligned buffer [addr, addr+nbytes) with mbind."""
    for offset, length, nodes, interleave in placement_ranges(placement, nbytes):
        bind_memory(addr + offset, length, nodes, interleave=interleave, strict=strict)
