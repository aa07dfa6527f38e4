"""The exact-size host pool (offload/pinned.py): sizes, views, RSS, lifetime, NUMA binding, CUDA pinning."""

from __future__ import annotations

import gc
import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_env

from longtune.offload.pinned import PAGE, HostPool, Slot, exact_pinned_empty

MiB = 1 << 20
ODD_LAYOUT = [
    ("a", (1000001,), torch.float32),
    ("b", (1000001,), torch.float32),
    ("c", (1000001,), torch.float32),
    ("d", (333, 777), torch.bfloat16),
]

needs_proc = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from Linux /proc")


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def test_pool_is_exact_size_and_slots_are_disjoint():
    with HostPool(ODD_LAYOUT, pin="off") as pool:
        raw = [math.prod(shape) * dtype.itemsize for _, shape, dtype in ODD_LAYOUT]
        assert pool.nbytes == round_up(sum(round_up(n, 64) for n in raw), PAGE)
        assert pool.nbytes - sum(raw) < 64 * len(raw) + PAGE
        assert pool.nbytes < 0.8 * 2 ** math.ceil(math.log2(sum(raw)))  # what power-of-two rounding would cost

        base = pool.tensor("a").data_ptr()
        assert base % PAGE == 0
        spans = []
        for slot, (name, shape, dtype) in zip(pool.slots(), ODD_LAYOUT):
            t = pool.tensor(name)
            assert (slot.name, t.shape, t.dtype, slot.nbytes) == (name, torch.Size(shape), dtype, t.nbytes)
            assert t.is_contiguous() and t.data_ptr() % 64 == 0
            assert base <= t.data_ptr() and t.data_ptr() + t.nbytes <= base + pool.nbytes
            assert t.data_ptr() - base == slot.offset
            spans.append((t.data_ptr(), t.data_ptr() + t.nbytes))
        spans.sort()
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))

        for value, (name, _, _) in enumerate(ODD_LAYOUT, start=1):
            pool.tensor(name).fill_(value)
        for value, (name, _, _) in enumerate(ODD_LAYOUT, start=1):
            t = pool.tensor(name)
            assert torch.equal(t, torch.full_like(t, value)), f"slot {name} was overwritten by a neighbour"


def test_views_are_stable_across_calls():
    with HostPool(ODD_LAYOUT, pin="off") as pool:
        first, second = pool.tensor("b"), pool.tensor("b")
        assert first.data_ptr() == second.data_ptr()
        first[12345] = 7.5
        assert second[12345].item() == 7.5
        assert pool.slots() == [Slot("a", 0, 4000004, (1000001,), torch.float32), *pool.slots()[1:]]


@pytest.mark.parametrize(
    "layout, kwargs, message",
    [
        ([("w", (4,), torch.float32), ("w", (2,), torch.float32)], {}, "duplicate slot name 'w'"),
        ([("zero", (4, 0), torch.float32)], {}, "slot 'zero'.*positive"),
        ([("neg", (-3,), torch.float32)], {}, "slot 'neg'.*positive"),
        ([("f", (2.5,), torch.float32)], {}, "slot 'f'.*tuple of ints"),
        ([("x", (4,), "float32")], {}, "slot 'x'.*torch.dtype"),
        ([], {}, "layout is empty"),
        ([("x", (4,), torch.float32)], {"align": 48}, "align must be a power of two"),
        ([("x", (4,), torch.float32)], {"align": 2}, "slot 'x'.*align=2.*element size 4"),
        ([("x", (4,), torch.float32)], {"pin": "yes"}, "pin must be one of"),
        ([("x", (4,), torch.float32)], {"numa_nodes": []}, "numa_nodes is empty"),
        ([("x", (4,), torch.float32)], {"interleave": True}, "interleave=True needs numa_nodes"),
    ],
)
def test_bad_layout_or_options_raise_a_clear_error(layout, kwargs, message):
    with pytest.raises(ValueError, match=message):
        HostPool(layout, **{"pin": "off", **kwargs})


def test_unknown_slot_names_the_nearest():
    layout = [(n, (8,), torch.float32) for n in ("exp_avg", "exp_avg_sq", "master", "grad")]
    with HostPool(layout, pin="off", name="adam") as pool:
        with pytest.raises(KeyError, match=r"no slot 'exp_avgs' in pool 'adam'; nearest: exp_avg, exp_avg_sq"):
            pool.tensor("exp_avgs")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_pin_on_without_cuda_is_refused_and_auto_stays_pageable():
    with pytest.raises(ValueError, match="pin='on' needs CUDA"):
        HostPool(ODD_LAYOUT, pin="on")
    with HostPool(ODD_LAYOUT) as pool:
        assert not pool.pinned and not pool.tensor("a").is_pinned()


def test_repr_for_logs():
    with HostPool(ODD_LAYOUT, pin="off", name="optim") as pool:
        assert repr(pool) == f"HostPool(optim, {pool.nbytes / MiB:.2f} MiB in 4 slots, pageable)"
    assert repr(pool) == f"HostPool(optim, {pool.nbytes / MiB:.2f} MiB in 4 slots, closed)"
    assert re.fullmatch(r"HostPool\(host, 1\.00 GiB in 1 slots, pageable\)",
                        repr(HostPool([("big", (1 << 28,), torch.float32)], pin="off")))


def test_close_is_idempotent_and_refuses_later_use():
    pool = HostPool(ODD_LAYOUT, pin="off")
    with pool:
        pool.tensor("a").fill_(1)
    assert pool.closed and not pool.pinned
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.tensor("a")


def mapped(addr: int) -> bool:
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= addr < end:
            return True
    return False


@needs_proc
def test_close_gives_the_memory_back_at_once():
    pool = HostPool([("x", (16 * MiB,), torch.float32)], pin="off")
    addr = pool.tensor("x").data_ptr()
    pool.tensor("x").fill_(1)
    before = rss_bytes()
    pool.close()
    assert before - rss_bytes() >= 0.9 * 64 * MiB
    assert not mapped(addr)


@needs_proc
def test_close_with_a_view_still_held_frees_the_pages_without_a_dangling_pointer():
    pool = HostPool([("x", (16 * MiB,), torch.float32)], pin="off")
    stale = pool.tensor("x")[1:]
    stale.fill_(3)
    before = rss_bytes()
    pool.close()
    assert before - rss_bytes() >= 0.9 * 64 * MiB
    # Documented as unusable; what matters is that it reads given-back pages, not freed memory.
    assert stale[:1000].sum().item() == 0


def test_tensors_outlive_an_unclosed_pool():
    kept = HostPool([("w", (1000,), torch.float64)], pin="off").tensor("w")
    kept.copy_(torch.arange(1000, dtype=torch.float64))
    gc.collect()
    torch.zeros(1 << 20).fill_(5)  # reuse of freed memory would show up as garbage below
    assert torch.equal(kept, torch.arange(1000, dtype=torch.float64))


@needs_proc
def test_exact_pinned_empty_lives_as_long_as_its_views():
    t = exact_pinned_empty((4 * MiB, 4), torch.float32)
    assert t.shape == (4 * MiB, 4) and t.dtype == torch.float32
    assert t.data_ptr() % PAGE == 0 and t.is_pinned() == torch.cuda.is_available()
    t.fill_(2)
    view = t[7]
    del t
    gc.collect()
    assert torch.equal(view, torch.full((4,), 2.0))
    before = rss_bytes()
    del view
    gc.collect()
    assert before - rss_bytes() >= 0.9 * 64 * MiB


def numa_policy_of(addr: int) -> str:
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= addr < end:
            break
    else:
        raise AssertionError(f"{addr:#x} is not mapped")
    for line in Path("/proc/self/numa_maps").read_text().splitlines():
        if int(line.split()[0], 16) == start:
            return line
    raise AssertionError(f"no numa_maps line for the mapping at {start:#x}")


@pytest.mark.skipif(not Path("/proc/self/numa_maps").exists(), reason="kernel without NUMA support")
@pytest.mark.parametrize("interleave, policy_word", [(False, "bind:0"), (True, "interleave:0")])
def test_numa_nodes_bind_the_region_before_first_touch(interleave, policy_word):
    try:
        from longtune.offload.numa import bind_memory  # noqa: F401
    except ImportError as err:
        pytest.skip(f"offload/numa.py not there yet: {err}")
    with HostPool([("x", (4 * MiB,), torch.float32)], pin="off", numa_nodes=[0], interleave=interleave) as pool:
        pool.tensor("x").fill_(1)
        policy = numa_policy_of(pool.tensor("x").data_ptr())
        assert policy_word in policy, policy
        on_node0 = re.search(r"\bN0=(\d+)", policy)
        assert on_node0 and int(on_node0[1]) * int(re.search(r"kernelpagesize_kB=(\d+)", policy)[1]) >= 16 * 1024, policy
        assert f"numa {'interleave' if interleave else 'bind'} [0]" in repr(pool)


RSS_CHILD = textwrap.dedent(
    """
    import json, time, torch
    from longtune.offload.pinned import PAGE, HostPool

    def rss():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE

    torch.zeros(1 << 22).fill_(1.0)  # start torch's threads and allocator now so they are not counted
    dtypes = [torch.float32, torch.bfloat16, torch.int8, torch.float64, torch.float16]
    layout = []
    for i in range(24):  # ~1 GiB in slots of odd, varied sizes and dtypes
        dtype = dtypes[i % len(dtypes)]
        numel = ((1 << 30) // 24 + i * 7919) // dtype.itemsize | 1
        layout.append((f"slot{i}", (numel,) if i % 2 else (3, numel // 3), dtype))
    before = rss()
    start = time.perf_counter()
    pool = HostPool(layout, name="rss")
    created = time.perf_counter() - start
    after_create = rss()
    start = time.perf_counter()
    for slot in pool.slots():
        pool.tensor(slot.name).fill_(1)
    filled = time.perf_counter() - start
    after_fill = rss()
    out = dict(placed=sum(s.nbytes for s in pool.slots()), mapped=pool.nbytes, pinned=pool.pinned,
               before=before, after_create=after_create, after_fill=after_fill, create_s=created, fill_s=filled)
    pool.close()
    if torch.cuda.is_available():  # the contrast, for the log only: the caching host allocator's rounding
        before = rss()
        pinned = torch.empty(out["placed"], dtype=torch.uint8).pin_memory()
        out["pin_memory_rss"] = rss() - before
    print(json.dumps(out))
    """
)


@needs_proc
def test_host_rss_tracks_the_bytes_placed():
    proc = subprocess.run([sys.executable, "-c", RSS_CHILD], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=cli_env())
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    placed, grown = got["placed"], got["after_fill"] - got["before"]
    ratio = grown / placed
    print(f"placed {placed / MiB:.1f} MiB, mapped {got['mapped'] / MiB:.1f} MiB, RSS grew {grown / MiB:.1f} MiB "
          f"(ratio {ratio:.4f}); create {got['create_s'] * 1e3:.1f} ms, fill {got['fill_s'] * 1e3:.0f} ms")
    if "pin_memory_rss" in got:
        print(f"torch pin_memory() of the same bytes grew RSS by {got['pin_memory_rss'] / MiB:.1f} MiB")
    assert 0.95 * placed <= grown <= 1.05 * placed, got
    if not got["pinned"]:  # unpinned pages are mapped lazily: creating the pool costs (almost) nothing
        assert got["after_create"] - got["before"] < 0.01 * placed, got


@pytest.mark.gpu
def test_cuda_pool_is_pinned_and_async_copies_round_trip():
    layout = [("src", (1000003,), torch.float32), ("back", (1000003,), torch.float32)]
    with HostPool(layout, pin="on") as pool:
        assert pool.pinned and "pinned" in repr(pool)
        src, back = pool.tensor("src"), pool.tensor("back")
        assert src.is_pinned() and back.is_pinned()
        src.copy_(torch.randn(1000003, generator=torch.Generator().manual_seed(0)))
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            on_gpu = src.to("cuda", non_blocking=True)
            back.copy_(on_gpu, non_blocking=True)
        stream.synchronize()
        assert torch.equal(back, src)
    staging = exact_pinned_empty((257, 3), torch.bfloat16)
    assert staging.is_pinned()


@pytest.mark.gpu
def test_a_failed_registration_is_not_reported_by_the_next_kernel():
    """cudaHostRegister of pages registered already fails; the error it leaves as CUDA's last error must not
    surface as the next kernel launch's own (torch checks cudaGetLastError after each launch)."""
    pool = HostPool([("a", (1 << 20,), torch.uint8)], pin="on")
    with pytest.raises(RuntimeError, match="cudaHostRegister of .* failed"):
        pool._mapping.register()  # the same pages a second time
    x = torch.ones(1024, device="cuda")
    assert float((x * 2).sum()) == 2048.0
    pool.close()
