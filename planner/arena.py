"""Addresses for the GPU buffers the offload runtime owns: one arena, packed by a MIP (MEMO's form).

Given a schedule (decisions, see evaluate.py), the runtime needs these buffers on the GPU, with the
lifetimes of timeline.py (one description for the memory rows, the arena and the runtime):

  staging.<l>     layer l's offloaded bytes on their way out (D2H): alive from the forward of l to the
                  end of the forward of l+1 (the copy overlaps l's forward and drains during l+1's;
                  prefetch depth 0: drained at the end of l's);
  prefetch.<l>    layer l's offloaded bytes coming back (H2D), same size: alive from the backward of
                  l+depth (the head, for the last layers) to the end of the backward of l.

Recomputed chunks are made by the model's own ops, so the allocator places them, not the arena (the memory
rows count them apart). Time is discrete: forward of layer l is time l (0..L-1), the head is time L,
backward of layer l is time 2L - l. Lifetimes are inclusive [start, end]. Layers that offload nothing get
no staging/prefetch.

Packing is dynamic storage allocation: give every buffer an offset so that two buffers alive at the
same time never share a byte, minimising the arena size. The MIP (MEMO, Zhao et al. 2024):
offset_i >= 0, arena M >= offset_i + size_i, and for every pair alive together a binary z_ij that
says which is below the other (big-M disjunction), big-M = the best-fit arena. Offsets are in units
of the alignment. A size-descending best fit is the upper bound, the fallback, and (with the peak of
live bytes, a lower bound no packing can beat) often already a proof of optimality.

The solver's offsets are used only for the order they imply: the final offsets are rebuilt exactly,
in integers, by lowest-fit placement in that order (never above the solver's, see _place_in_order),
so solver tolerances cannot produce an overlapping or misaligned plan.

Pure Python + PuLP (HiGHS through highspy when available, else CBC); no torch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import pulp

from .evaluate import Decisions
from .milp import quiet_stdout
from .problem import Problem
from .timeline import REGION_SLACK_BYTES, prefetch_lifetime, staging_lifetime
from .vocabulary import GPU, RECOMPUTE


@dataclass(frozen=True)
class Buffer:
    name: str
    size: int  # bytes
    start: int  # first time step it is alive (inclusive)
    end: int  # last time step it is alive (inclusive)

    def overlaps_in_time(self, other: "Buffer") -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass
class ArenaResult:
    offsets: dict[str, int]  # bytes, each a multiple of the alignment
    size: int  # bytes: the highest offset + size over all buffers
    lower_bound: int  # bytes: the most bytes alive at any one time; no packing does better
    gap: float  # (size - lower_bound) / size
    # solve_arena: "mip" | "best_fit" (best fit when it is already optimal, or the MIP found nothing better).
    # plan_arena: "<how>:<which>", how = "direct" (all buffers in one MIP) or "bilevel" (layer blocks, then
    # the model), which = the model-level result's "mip" | "best_fit".
    method: str
    solve_s: float


# ---------------------------------------------------------------------------------------------------------
# The buffers of a schedule


def _bytes(x: float) -> int:
    # chunk_bytes are floats (tokens / chunks need not divide); a buffer holds whole bytes.
    return int(math.ceil(round(x, 6)))


def runtime_buffers(problem: Problem, decisions: Decisions) -> list[Buffer]:
    """The staging and prefetch buffers of a schedule, with their lifetimes (see the module doc)."""
    L, depth = problem.num_layers, problem.prefetch_depth
    if len(decisions) != L:
        raise ValueError(f"{len(decisions)} layers decided, the model has {L}")
    tiers = {t.name for t in problem.tiers}
    out: list[Buffer] = []
    prefetch: list[Buffer] = []
    for l, layer in enumerate(decisions):
        unknown = {p for d in layer.values() for p in d} - tiers - {GPU, RECOMPUTE}
        if unknown:
            raise ValueError(f"layer {l}: unknown place {sorted(unknown)}")
        size = sum(layer_region_bytes(problem, layer).values())
        if size > 0:
            out.append(Buffer(f"staging.{l}", size, *staging_lifetime(l, L, depth)))
            prefetch.append(Buffer(f"prefetch.{l}", size, *prefetch_lifetime(l, L, depth)))
    return out + prefetch


def layer_region_bytes(problem: Problem, layer: dict[str, dict[str, int]]) -> dict[str, int]:
    """Bytes layer `layer` sends to each tier: what its buffers and host regions are sized to (with slack for
    the runtime's alignment of each storage), a multiple of 512 bytes."""
    tiers = [t.name for t in problem.tiers]
    out = {}
    for tier in tiers:
        chunks = sum(d.get(tier, 0) for d in layer.values())
        if chunks:
            raw = sum(problem.chunk_bytes[c] * d.get(tier, 0) for c, d in layer.items())
            out[tier] = -(-(_bytes(raw) + chunks * REGION_SLACK_BYTES) // 512) * 512
    return out


# ---------------------------------------------------------------------------------------------------------
# Packing: items with a set of live times (a buffer's interval, or a bi-level block's union of intervals)


@dataclass(frozen=True)
class _Item:
    name: str
    size: int  # bytes
    times: frozenset[int]


def _items(buffers: Sequence[Buffer]) -> list[_Item]:
    names = [b.name for b in buffers]
    if len(set(names)) != len(names):
        raise ValueError("buffer names must be unique")
    for b in buffers:
        if b.size < 0 or b.end < b.start:
            raise ValueError(f"buffer {b.name}: size {b.size}, lifetime [{b.start}, {b.end}]")
    return [_Item(b.name, int(b.size), frozenset(range(b.start, b.end + 1))) for b in buffers]


def _units(size: int, alignment: int) -> int:
    return -(-size // alignment)


def _peak(items: Sequence[_Item]) -> int:
    """The most bytes alive at one time: a lower bound on any arena."""
    alive: dict[int, int] = {}
    for it in items:
        for t in it.times:
            alive[t] = alive.get(t, 0) + it.size
    return max(alive.values(), default=0)


def _aligned_peak(items: Sequence[_Item], alignment: int) -> int:
    """The same bound for aligned offsets: at any time the live items stack, each but the top one taking whole
    units, so the arena is at least alignment * (their units) less the top one's unused tail. >= _peak."""
    units: dict[int, int] = {}
    slack: dict[int, int] = {}
    for it in items:
        if not it.size:
            continue
        u = _units(it.size, alignment)
        for t in it.times:
            units[t] = units.get(t, 0) + u
            slack[t] = max(slack.get(t, 0), u * alignment - it.size)
    return max((units[t] * alignment - slack[t] for t in units), default=0)


def _conflicts(items: Sequence[_Item]) -> list[tuple[int, int]]:
    """Pairs (i < j) alive at the same time; empty buffers conflict with nothing."""
    return [
        (i, j)
        for i in range(len(items))
        for j in range(i + 1, len(items))
        if items[i].size and items[j].size and not items[i].times.isdisjoint(items[j].times)
    ]


def _place_in_order(items: Sequence[_Item], order: Iterable[int], alignment: int) -> list[int]:
    """Lowest fit, in units of the alignment: each item at the lowest offset clear of the items placed before it
    that are alive at the same time.

    Placed in increasing order of any valid packing's offsets, no item lands above its offset there (the items
    below it in that packing end below it, and stay there), so over all orders this reaches the optimum.
    """
    units = [_units(it.size, alignment) for it in items]
    offsets: list[Optional[int]] = [None] * len(items)
    placed: list[int] = []
    for i in order:
        if units[i] == 0:
            offsets[i] = 0
            continue
        taken = sorted(
            (offsets[j], offsets[j] + units[j]) for j in placed if not items[i].times.isdisjoint(items[j].times)
        )
        candidate = 0
        for lo, hi in taken:
            if candidate + units[i] <= lo:
                break
            candidate = max(candidate, hi)
        offsets[i] = candidate
        placed.append(i)
    assert all(o is not None for o in offsets), "order must name every item"
    return offsets  # type: ignore[return-value]


def _top(items: Sequence[_Item], offsets_units: Sequence[int], alignment: int) -> int:
    return max((o * alignment + it.size for it, o in zip(items, offsets_units) if it.size), default=0)


def _best_fit_order(items: Sequence[_Item]) -> list[int]:
    return sorted(range(len(items)), key=lambda i: (-items[i].size, min(items[i].times, default=0), items[i].name))


def best_fit(buffers: Sequence[Buffer], alignment: int = 512) -> dict[str, int]:
    """Greedy: largest first, each at the lowest aligned offset clear of the placed buffers alive with it."""
    if alignment < 1:
        raise ValueError("alignment must be >= 1")
    items = _items(buffers)
    units = _place_in_order(items, _best_fit_order(items), alignment)
    return {it.name: o * alignment for it, o in zip(items, units)}


def _solver(time_limit: float, gap: float, solver: Optional[str]):
    name = solver or ("HiGHS" if "HiGHS" in pulp.listSolvers(onlyAvailable=True) else "PULP_CBC_CMD")
    # No warm start: PuLP passes none to HiGHS (the bound M <= best fit stands in), and CBC given best fit as
    # one (warmStart=True) closed fewer 32-80 layer instances within the limit than CBC without it.
    if name == "HiGHS":
        return pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=gap)
    if name == "PULP_CBC_CMD":
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap)
    raise ValueError(f"unknown solver {name}; use HiGHS or PULP_CBC_CMD")


def _variable(prob: pulp.LpProblem, name: str, low: float, up: float, cat: str = "Continuous") -> pulp.LpVariable:
    if hasattr(prob, "add_variable"):  # PuLP >= 3.3; bare LpVariable(...) is deprecated there
        return prob.add_variable(name, low, up, cat=cat)
    return pulp.LpVariable(name, low, up, cat=cat)


@dataclass
class _Packed:
    offsets: list[int]  # units of the alignment
    size: int  # bytes
    lower_bound: int  # bytes
    method: str  # mip | best_fit


def _solve_items(
    items: Sequence[_Item], time_limit: float, alignment: int, gap: float, solver: Optional[str]
) -> _Packed:
    """Best fit, then the big-M MIP when best fit is not already at the lower bound."""
    if alignment < 1:
        raise ValueError("alignment must be >= 1")
    lb = _peak(items)
    aligned_lb = _aligned_peak(items, alignment)
    bf = _place_in_order(items, _best_fit_order(items), alignment)
    bf_size = _top(items, bf, alignment)
    pairs = _conflicts(items)
    if bf_size <= aligned_lb or not pairs:  # best fit meets the bound: optimal, nothing to solve
        return _Packed(bf, bf_size, lb, "best_fit")

    # Units of the alignment, scaled so the arena is ~1e3 in the model: bytes run to 1e11, and big-M rows with
    # coefficients that large leave the solver's absolute tolerances below double precision.
    units = [_units(it.size, alignment) for it in items]
    scale = max(1.0, bf_size / alignment / 1000.0)
    u = [x / scale for x in units]
    top = [it.size / alignment / scale for it in items]  # how far the arena reaches above an item's offset
    ub = bf_size / alignment / scale
    big_m = ub + max(u)
    prob = pulp.LpProblem("arena", pulp.LpMinimize)
    # The peak bound as M's lower bound: the big-M relaxation alone bounds M by the largest item only.
    arena = _variable(prob, "arena", aligned_lb / alignment / scale, ub)
    off = [_variable(prob, f"off_{i}", 0, max(0.0, ub - top[i])) for i in range(len(items))]
    prob += arena
    for i, it in enumerate(items):
        if it.size:
            prob += arena >= off[i] + top[i]
    for i, j in pairs:
        z = _variable(prob, f"z_{i}_{j}", 0, 1, "Binary")  # 1: i below j
        below = 1 if bf[i] < bf[j] else 0
        if items[i].size == items[j].size and items[i].times == items[j].times:
            prob += z == below  # interchangeable buffers: fix their order, as best fit has it (symmetry)
        prob += off[i] + u[i] <= off[j] + big_m * (1 - z)
        prob += off[j] + u[j] <= off[i] + big_m * z
    try:
        with quiet_stdout():
            prob.solve(_solver(time_limit, gap, solver))
    except pulp.PulpSolverError:
        return _Packed(bf, bf_size, lb, "best_fit")
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return _Packed(bf, bf_size, lb, "best_fit")
    values = [v.varValue for v in off]
    if any(v is None for v in values):
        return _Packed(bf, bf_size, lb, "best_fit")
    # Rebuild exact integer offsets from the order the solution implies (ties: best-fit order).
    rank = {i: r for r, i in enumerate(_best_fit_order(items))}
    order = sorted(range(len(items)), key=lambda i: (round(values[i] * scale, 3), rank[i]))
    mip = _place_in_order(items, order, alignment)
    mip_size = _top(items, mip, alignment)
    if mip_size < bf_size:
        return _Packed(mip, mip_size, lb, "mip")
    return _Packed(bf, bf_size, lb, "best_fit")


def _result(items: Sequence[_Item], packed: _Packed, alignment: int, method: str, start: float) -> ArenaResult:
    size = packed.size
    return ArenaResult(
        offsets={it.name: o * alignment for it, o in zip(items, packed.offsets)},
        size=size,
        lower_bound=packed.lower_bound,
        gap=(size - packed.lower_bound) / size if size else 0.0,
        method=method,
        solve_s=time.perf_counter() - start,
    )


def solve_arena(
    buffers: Sequence[Buffer],
    time_limit: float = 5.0,
    alignment: int = 512,
    gap: float = 1e-4,
    solver: Optional[str] = None,
) -> ArenaResult:
    """The arena MIP over all buffers; never worse than best fit (its fallback and upper bound)."""
    start = time.perf_counter()
    items = _items(buffers)
    packed = _solve_items(items, time_limit, alignment, gap, solver)
    return _result(items, packed, alignment, packed.method, start)


# ---------------------------------------------------------------------------------------------------------
# Bi-level (MEMO): pack each layer's block, then the model with each block as one item


def _layer_of(name: str) -> Optional[int]:
    kind, _, index = name.partition(".")
    return int(index) if kind in ("staging", "prefetch") else None


def _bilevel(
    buffers: Sequence[Buffer], time_limit: float, alignment: int, gap: float, solver: Optional[str]
) -> tuple[list[_Item], _Packed]:
    """Layer blocks first (solved once per distinct pattern), then the model-level instance.

    A block's lifetime is the union of its members' live times, not their hull [l, 2L - l]: with the hull every
    block would be alive at the head, and the model level could only stack them all (the sum of every layer's
    offloaded bytes, the very thing offloading avoids). With the union, a block conflicts with what its members
    conflict with, and nothing else.
    """
    items = _items(buffers)
    groups: dict[int, list[int]] = {}
    loose: list[int] = []
    for i, it in enumerate(items):
        layer = _layer_of(it.name)
        (groups.setdefault(layer, []) if layer is not None else loose).append(i)

    cache: dict[tuple, tuple[list[int], int]] = {}  # pattern -> member offsets (units), block size (bytes)
    blocks: list[tuple[_Item, list[int], list[int]]] = []  # (block item, member indices, member offsets)
    for layer, members in sorted(groups.items()):
        sub = [items[i] for i in members]
        conflicts = tuple(_conflicts(sub))
        key = (tuple(it.size for it in sub), conflicts)
        if key not in cache:
            packed = _solve_items(sub, time_limit, alignment, gap, solver)
            cache[key] = (packed.offsets, packed.size)
        rel, size = cache[key]
        block = _Item(f"block.{layer}", size, frozenset().union(*(it.times for it in sub)))
        blocks.append((block, members, rel))

    model_items = [b for b, _, _ in blocks] + [items[i] for i in loose]
    packed = _solve_items(model_items, time_limit, alignment, gap, solver)
    offsets = [0] * len(items)
    for (_, members, rel), base in zip(blocks, packed.offsets):
        for i, r in zip(members, rel):
            offsets[i] = base + r
    for i, o in zip(loose, packed.offsets[len(blocks):]):
        offsets[i] = o
    return items, _Packed(offsets, _top(items, offsets, alignment), _peak(items), packed.method)


# Which form to use. MEMO packs one layer's tensors, then the model with each layer's block as one item, because
# its per-layer instance repeats and the model instance stays small. Here the buffers cross layers (a staging
# buffer spans two forwards, a prefetch two backwards, and a layer's two buffers live far apart), so a packed
# block pins staging.l and prefetch.l to one offset, and the last layer's block (whose two buffers meet at the
# head) is charged double through the forward pass. The direct instance is small: about 2L + 4 buffers and 6L
# alive-together pairs. Measured (2 cores, HiGHS 1.16, 20 random schedules each of a Llama-3-8B shape, 128k
# tokens): the direct MIP reached the peak-live lower bound every time, worst 0.06 s / 0.14 s / 0.66 s for
# 8 / 32 / 80 layers (best fit alone: up to 26% above it), while the bi-level result was often no better than
# best fit. So: the direct MIP first, with half the time; at the bound it is optimal and ends the call;
# otherwise the bi-level form gets the rest, and the smaller arena wins. Past DIRECT_MAX_PAIRS binaries the
# direct MIP is skipped (bi-level only), which no realistic layer count reaches (~6L pairs).
DIRECT_MAX_PAIRS = 5000


def plan_arena(
    problem: Problem,
    decisions: Decisions,
    time_limit: float = 5.0,
    alignment: int = 512,
    gap: float = 1e-4,
    solver: Optional[str] = None,
) -> ArenaResult:
    """Offsets for every runtime buffer of a schedule: the direct MIP or MEMO's bi-level form, the smaller.

    `time_limit` bounds the solver time of the whole call (roughly): half to the direct MIP, the rest to the
    bi-level form when the direct result is not provably optimal. `method` says which result was kept.
    """
    start = time.perf_counter()
    buffers = runtime_buffers(problem, decisions)
    items = _items(buffers)
    candidates: list[tuple[_Packed, str]] = []
    if len(_conflicts(items)) <= DIRECT_MAX_PAIRS:
        direct = _solve_items(items, time_limit / 2, alignment, gap, solver)
        if direct.size <= _aligned_peak(items, alignment):  # at the lower bound: optimal
            return _result(items, direct, alignment, f"direct:{direct.method}", start)
        candidates.append((direct, f"direct:{direct.method}"))
    left = max(0.5, time_limit - (time.perf_counter() - start))
    bi_items, bi = _bilevel(buffers, left / 2, alignment, gap, solver)  # the two levels share what is left
    assert [it.name for it in bi_items] == [it.name for it in items]
    candidates.append((bi, f"bilevel:{bi.method}"))
    packed, method = min(candidates, key=lambda c: c[0].size)  # ties: the direct result (listed first)
    return _result(items, packed, alignment, method, start)


def check_no_overlap(buffers: Sequence[Buffer], offsets: dict[str, int]) -> None:
    """Raise ValueError naming two buffers alive at the same time whose bytes overlap (or a missing offset)."""
    for b in buffers:
        if b.name not in offsets:
            raise ValueError(f"no offset for buffer {b.name}")
        if offsets[b.name] < 0:
            raise ValueError(f"buffer {b.name} at negative offset {offsets[b.name]}")
    live = [b for b in buffers if b.size > 0]
    for i, a in enumerate(live):
        oa = offsets[a.name]
        for b in live[i + 1:]:
            ob = offsets[b.name]
            if a.overlaps_in_time(b) and oa < ob + b.size and ob < oa + a.size:
                raise ValueError(
                    f"buffers {a.name} [{oa}, {oa + a.size}) and {b.name} [{ob}, {ob + b.size}) overlap in memory "
                    f"while both alive (times [{a.start}, {a.end}] and [{b.start}, {b.end}])"
                )
