"""The NUMA layer: sysfs parsing, the real mbind(2), the CXL-aware placement, the bandwidth cap."""

from __future__ import annotations

import ctypes
import mmap
import platform
import time
from pathlib import Path

import pytest
import torch

from longtune.offload.numa import (
    GiB, BandwidthCap, NumaNode, bind_memory, cxl_nodes, describe, local_nodes, memory_policy_nodes, page_node,
    read_nodes,
)
from longtune.offload.placement import Placement, PlacementRequest, TensorKind, bind_placement, place, placement_ranges

K = TensorKind
PAGE = mmap.PAGESIZE


def write_node(root: Path, node: int, cpulist: str, total_kb: int, free_kb: int, distance: str) -> None:
    d = root / f"node{node}"
    d.mkdir(parents=True)
    (d / "cpulist").write_text(cpulist + "\n")
    (d / "distance").write_text(distance + "\n")
    # Same layout as the kernel's node meminfo (a subset of its lines).
    (d / "meminfo").write_text(
        f"Node {node} MemTotal:       {total_kb} kB\n"
        f"Node {node} MemFree:        {free_kb} kB\n"
        f"Node {node} MemUsed:        {total_kb - free_kb} kB\n"
        f"Node {node} SwapCached:            0 kB\n"
        f"Node {node} HugePages_Total:     0\n"
    )


@pytest.fixture
def two_node_sysfs(tmp_path) -> Path:
    root = tmp_path / "node"
    write_node(root, 0, "0-15", 128 * 1024 * 1024, 100 * 1024 * 1024, "10 20")
    write_node(root, 1, "", 256 * 1024 * 1024, 250 * 1024 * 1024, "20 10")
    (root / "online").write_text("0-1\n")
    (root / "has_memory").write_text("0-1\n")
    (root / "has_cpu").write_text("0\n")
    return root


def test_read_nodes_parses_a_two_node_tree_with_a_cxl_node(two_node_sysfs):
    nodes = read_nodes(two_node_sysfs)
    assert [n.id for n in nodes] == [0, 1]
    node0, node1 = nodes
    assert node0 == NumaNode(0, tuple(range(16)), 128 * GiB, 100 * GiB, (10, 20))
    assert node1 == NumaNode(1, (), 256 * GiB, 250 * GiB, (20, 10))
    assert not node0.is_cxl and node1.is_cxl
    assert local_nodes(nodes) == [node0] and cxl_nodes(nodes) == [node1]
    assert describe(nodes).splitlines() == [
        "node 0: local DRAM (CPUs 0-15), 128.0 GiB, 100.0 GiB free",
        "node 1: CXL (no CPUs), 256.0 GiB, 250.0 GiB free",
    ]


def test_read_nodes_skips_nodes_not_online_or_without_memory(two_node_sysfs):
    write_node(two_node_sysfs, 2, "16-31", 0, 0, "20 20 10")  # CPU-only node, absent from has_memory
    write_node(two_node_sysfs, 3, "", 64 * 1024, 64 * 1024, "30 30 30 10")  # offline
    (two_node_sysfs / "online").write_text("0-2\n")
    assert [n.id for n in read_nodes(two_node_sysfs)] == [0, 1]


def test_read_nodes_rejects_a_missing_tree_and_a_bad_meminfo(tmp_path, two_node_sysfs):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        read_nodes(tmp_path / "nope")
    (two_node_sysfs / "node1" / "meminfo").write_text("garbage\n")
    with pytest.raises(ValueError, match="no MemTotal line"):
        read_nodes(two_node_sysfs)


def test_read_nodes_on_this_machine():
    nodes = read_nodes()
    assert nodes[0].id == 0 and nodes[0].cpus == (0, 1)
    assert 0 < nodes[0].free_bytes <= nodes[0].total_bytes
    assert describe(nodes).splitlines()[-1] == "no CXL node: the cxl tier is emulated on node 0"


def fake_nodes(cxl_count: int, cxl_gib: int = 256) -> list[NumaNode]:
    n = 1 + cxl_count
    local = NumaNode(0, tuple(range(16)), 512 * GiB, 400 * GiB, (10,) + (20,) * cxl_count)
    return [local] + [NumaNode(i, (), cxl_gib * GiB, cxl_gib * GiB, tuple(10 if j == i else 20 for j in range(n)))
                      for i in range(1, n)]


FP32 = 28 * 10**9  # 7e9 parameters x 4 bytes
BF16 = 14 * 10**9


def seven_b_requests(activations: int = 40 * 10**9) -> list[PlacementRequest]:
    # Deliberately not in priority order: place() must sort internally and answer in request order.
    return [
        PlacementRequest("bf16_weights", BF16, K.BF16_WEIGHT),
        PlacementRequest("master_weights", FP32, K.FP32_MASTER_WEIGHT),
        PlacementRequest("momentum", FP32, K.FP32_MOMENTUM),
        PlacementRequest("activations", activations, K.ACTIVATION),
        PlacementRequest("variance", FP32, K.FP32_VARIANCE),
        PlacementRequest("bf16_grads", BF16, K.BF16_GRAD),
        PlacementRequest("master_grads", FP32, K.FP32_MASTER_GRAD),
    ]


def test_worked_example_of_liaw_and_chen():
    budget = 100 * GiB
    got = {p.name: p for p in place(seven_b_requests(), fake_nodes(1), budget)}
    remaining = budget - 3 * FP32
    assert remaining < FP32  # the master weights really straddle the budget
    assert got["momentum"] == Placement("momentum", (0,), False, FP32, 0)
    assert got["variance"] == Placement("variance", (0,), False, FP32, 0)
    assert got["master_grads"] == Placement("master_grads", (0,), False, FP32, 0)
    local_share = min(remaining, FP32 // 2)
    assert local_share == FP32 // 2
    assert got["master_weights"] == Placement("master_weights", (0, 1), True, local_share, FP32 - local_share)
    assert got["bf16_weights"] == Placement("bf16_weights", (1,), False, 0, BF16)
    assert got["activations"] == Placement("activations", (1,), False, 0, 40 * 10**9)
    assert got["bf16_grads"] == Placement("bf16_grads", (1,), False, 0, BF16)


def test_results_come_back_in_request_order():
    requests = seven_b_requests()
    assert [p.name for p in place(requests, fake_nodes(1), 100 * GiB)] == [r.name for r in requests]


def test_a_small_remaining_budget_caps_the_local_share():
    budget = 3 * FP32 + 5 * 10**9  # 5 GB left: less than half of the master weights
    got = {p.name: p for p in place(seven_b_requests(), fake_nodes(1), budget)}
    assert got["master_weights"] == Placement("master_weights", (0, 1), True, 5 * 10**9, FP32 - 5 * 10**9)
    # The head is interleaved over both nodes, the tail bound to CXL, so node 0 gets the planned 5 GB.
    (o1, n1, nodes1, il1), (o2, n2, nodes2, il2) = placement_ranges(got["master_weights"], FP32)
    assert (o1, nodes1, il1) == (0, (0, 1), True) and n1 // 2 <= 5 * 10**9 < n1 // 2 + PAGE
    assert (o2, n2, nodes2, il2) == (n1, FP32 - n1, (1,), False)


def test_two_cxl_nodes_are_striped_and_the_straddler_spans_three_nodes():
    budget = 3 * FP32 + 20 * 10**9  # 20 GB left >= 28 GB / 3
    got = {p.name: p for p in place(seven_b_requests(), fake_nodes(2), budget)}
    assert got["momentum"] == Placement("momentum", (0,), False, FP32, 0)
    share = FP32 // 3
    assert got["master_weights"] == Placement("master_weights", (0, 1, 2), True, share, FP32 - share)
    for name, size in [("bf16_weights", BF16), ("activations", 40 * 10**9), ("bf16_grads", BF16)]:
        assert got[name] == Placement(name, (1, 2), True, 0, size)
    # An even split already gives node 0 its share: one interleaved range.
    assert placement_ranges(got["master_weights"], FP32) == [(0, FP32, (0, 1, 2), True)]


def test_without_cxl_everything_is_local_and_overflow_names_the_missing_bytes():
    nodes = fake_nodes(0)
    need = 4 * FP32 + 2 * BF16 + 40 * 10**9
    got = place(seven_b_requests(), nodes, need)
    assert all(p.nodes == (0,) and not p.interleave and p.cxl_bytes == 0 for p in got)
    assert sum(p.local_bytes for p in got) == need
    with pytest.raises(ValueError, match=r": 12345 bytes missing"):
        place(seven_b_requests(), nodes, need - 12345)


def test_full_cxl_falls_back_to_local_and_overflow_counts_cxl_free_bytes():
    nodes = fake_nodes(1, cxl_gib=10)
    got = {p.name: p for p in place(seven_b_requests(activations=5 * 10**9), nodes, 400 * GiB)}
    assert got["activations"].nodes == (1,)  # 5 GB fits the 10 GiB card
    assert got["bf16_weights"].nodes == (0,)  # 14 GB does not, and the local budget has room
    need = 4 * FP32 + 2 * BF16 + 5 * 10**9
    with pytest.raises(ValueError, match=f": {need - (50 * 10**9 + 10 * GiB)} bytes missing"):
        place(seven_b_requests(activations=5 * 10**9), nodes, 50 * 10**9)


def test_bad_placement_input_is_rejected():
    with pytest.raises(ValueError, match="local_budget_bytes must be >= 0"):
        place([], fake_nodes(1), -1)
    with pytest.raises(ValueError, match="no.*CPUs|none given"):
        place([], fake_nodes(1)[1:], GiB)
    with pytest.raises(ValueError, match="bad placement request"):
        place([PlacementRequest("x", -5, K.ACTIVATION)], fake_nodes(1), GiB)
    with pytest.raises(ValueError, match="local_node 1 is not a node with CPUs"):
        place([], fake_nodes(1), GiB, local_node=1)


needs_mbind = pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"),
                                 reason="mbind syscall numbers are known for x86_64 and aarch64 only")


@pytest.fixture
def region():
    size = 8 << 20
    m = mmap.mmap(-1, size)
    buf = (ctypes.c_char * size).from_buffer(m)
    yield ctypes.addressof(buf), size, m
    del buf
    m.close()


@needs_mbind
def test_real_mbind_binds_and_interleaves_on_node_0(region):
    addr, size, m = region
    bind_memory(addr, size, [0])
    m[:] = b"\x01" * size  # fault every page in under the new policy
    policy = memory_policy_nodes(addr)
    assert (policy.mode, policy.nodes) == ("bind", (0,))
    assert page_node(addr + size - PAGE) == 0
    bind_memory(addr, size, [0], interleave=True, strict=True)
    policy = memory_policy_nodes(addr + PAGE)
    assert (policy.mode, policy.nodes) == ("interleave", (0,))
    bind_placement(addr, size // 2, Placement("t", (0,), False, size // 2, 0))
    assert memory_policy_nodes(addr).mode == "bind"
    assert memory_policy_nodes(addr + size - PAGE).mode == "interleave"  # outside the range: untouched


@needs_mbind
def test_real_mbind_errors_are_clear(region):
    addr, size, _ = region
    with pytest.raises(OSError, match=r"node 7 does not exist on this machine \(online NUMA nodes: 0"):
        bind_memory(addr, size, [7])
    with pytest.raises(ValueError, match="page-aligned"):
        bind_memory(addr + 1, PAGE, [0])
    with pytest.raises(ValueError, match="page-aligned"):
        bind_memory(addr, PAGE + 1, [0])
    with pytest.raises(ValueError, match="node ids"):
        bind_memory(addr, size, [])


def test_bandwidth_cap_slows_the_copy_and_copies_exactly():
    src = torch.randn(50 * 10**6 // 4)
    dst = torch.empty_like(src)
    start = time.perf_counter()
    BandwidthCap(1e9).copy_(dst, src)
    assert time.perf_counter() - start >= 0.05
    assert torch.equal(dst, src)


def test_bandwidth_cap_none_does_not_sleep(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    src = torch.arange(1000.0)
    dst = torch.zeros(1000)
    cap = BandwidthCap(None)
    cap.copy_(dst, src)
    assert not cap.emulated and not slept and torch.equal(dst, src)
    assert BandwidthCap(1.0).emulated
    with pytest.raises(ValueError, match="bytes_per_s must be > 0"):
        BandwidthCap(0)
    with pytest.raises(ValueError, match="equal shapes"):
        cap.copy_(torch.zeros(3), torch.zeros(1))
