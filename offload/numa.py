"""NUMA nodes, the real mbind(2)/get_mempolicy(2), and a bandwidth cap that emulates a slow tier.

CXL memory appears on Linux as a NUMA node with memory and no CPUs; `cxl_nodes` finds those.
The policy that decides which tensors go there is in placement.py, built on this module.
The syscalls go through ctypes so the default path needs no libnuma from apt.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

SYSFS_NODES = "/sys/devices/system/node"
GiB = 1 << 30


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: tuple[int, ...]
    total_bytes: int
    free_bytes: int
    distances: tuple[int, ...]

    @property
    def is_cxl(self) -> bool:
        """Memory and no CPUs: how a CXL memory expander shows up."""
        return self.total_bytes > 0 and not self.cpus


def parse_cpulist(text: str) -> tuple[int, ...]:
    """The kernel's list format ("0-3,8", or empty for a CPU-less node) as sorted ids."""
    ids: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        try:
            ids.update(range(int(low), int(high or low) + 1))
        except ValueError:
            raise ValueError(f"bad CPU/node list {text.strip()!r}: expected a form like '0-3,8'") from None
    return tuple(sorted(ids))


def format_cpulist(ids: Sequence[int]) -> str:
    runs: list[tuple[int, int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _meminfo_bytes(text: str, field: str, source: Path) -> int:
    # Lines look like "Node 0 MemTotal:       24684096 kB".
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == f"{field}:":
            return int(parts[3]) * 1024
    raise ValueError(f"{source} has no {field} line: not a kernel node meminfo file")


def _single_node_from_proc() -> list[NumaNode]:
    # A kernel built without NUMA has no node directory; the whole machine is then node 0.
    text = Path("/proc/meminfo").read_text()
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in text.splitlines() if line.endswith("kB")}
    return [NumaNode(0, tuple(range(os.cpu_count() or 1)), fields["MemTotal"], fields["MemFree"], (10,))]


def read_nodes(sysfs_root: str | Path = SYSFS_NODES) -> list[NumaNode]:
    """The machine's NUMA nodes that are online and have memory, from sysfs."""
    root = Path(sysfs_root)
    if not root.is_dir():
        if str(sysfs_root) == SYSFS_NODES:
            return _single_node_from_proc()
        raise FileNotFoundError(f"{root} is not a directory: expected a sysfs node tree like {SYSFS_NODES}")
    ids = sorted(int(p.name[4:]) for p in root.glob("node[0-9]*") if p.name[4:].isdigit())
    for listing in ("online", "has_memory"):
        if (root / listing).exists():
            wanted = set(parse_cpulist((root / listing).read_text()))
            ids = [i for i in ids if i in wanted]
    nodes = []
    for i in ids:
        d = root / f"node{i}"
        meminfo = (d / "meminfo").read_text()
        nodes.append(NumaNode(
            id=i,
            cpus=parse_cpulist((d / "cpulist").read_text()),
            total_bytes=_meminfo_bytes(meminfo, "MemTotal", d / "meminfo"),
            free_bytes=_meminfo_bytes(meminfo, "MemFree", d / "meminfo"),
            distances=tuple(int(x) for x in (d / "distance").read_text().split()),
        ))
    return nodes


def local_nodes(nodes: Sequence[NumaNode]) -> list[NumaNode]:
    return [n for n in nodes if n.cpus]


def cxl_nodes(nodes: Sequence[NumaNode]) -> list[NumaNode]:
    return [n for n in nodes if n.is_cxl]


def describe(nodes: Sequence[NumaNode]) -> str:
    """One line per node, plus a note when the CXL tier has to be emulated."""
    if not nodes:
        return "no NUMA node with memory found"
    lines = []
    for n in nodes:
        kind = "CXL (no CPUs)" if n.is_cxl else f"local DRAM (CPUs {format_cpulist(n.cpus)})"
        lines.append(f"node {n.id}: {kind}, {n.total_bytes / GiB:.1f} GiB, {n.free_bytes / GiB:.1f} GiB free")
    if not cxl_nodes(nodes):
        home = (local_nodes(nodes) or list(nodes))[0].id
        lines.append(f"no CXL node: the cxl tier is emulated on node {home}")
    return "\n".join(lines)


# --- mbind(2) / get_mempolicy(2) through ctypes -------------------------------------------

_SYSCALLS = {"x86_64": {"mbind": 237, "get_mempolicy": 239}, "aarch64": {"mbind": 235, "get_mempolicy": 236}}
MPOL_MODES = ("default", "preferred", "bind", "interleave", "local", "preferred_many", "weighted_interleave")
MPOL_BIND, MPOL_INTERLEAVE = 2, 3
MPOL_MF_STRICT, MPOL_MF_MOVE = 1, 2
MPOL_F_NODE, MPOL_F_ADDR = 1, 2
_MODE_FLAGS = (1 << 15) | (1 << 14) | (1 << 13)  # STATIC_NODES, RELATIVE_NODES, NUMA_BALANCING
_READBACK_BITS = 1024  # get_mempolicy fails with EINVAL if the mask is shorter than the kernel's node count


def _syscall_number(name: str) -> int:
    machine = platform.machine()
    if machine not in _SYSCALLS:
        raise OSError(errno.ENOSYS, f"{name}: no syscall number known for CPU architecture {machine!r}")
    return _SYSCALLS[machine][name]


def _syscall(name: str, *args) -> None:
    number = _syscall_number(name)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(ctypes.c_long(number), *args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _nodemask(nodes: Sequence[int]) -> tuple[ctypes.Array, int]:
    words = max(nodes) // 64 + 1
    mask = (ctypes.c_ulong * words)()
    for n in nodes:
        mask[n // 64] |= 1 << (n % 64)
    # The kernel reads maxnode - 1 bits (libnuma passes size + 1 the same way).
    return mask, words * 64 + 1


def _online_nodes() -> tuple[int, ...] | None:
    try:
        return parse_cpulist(Path(SYSFS_NODES, "online").read_text())
    except OSError:
        return None


def _explain(err: int, addr: int, nbytes: int, nodes: Sequence[int], strict: bool) -> str:
    where = f"[{addr:#x}, +{nbytes})"
    if err == errno.EINVAL:
        online = _online_nodes()
        missing = [n for n in nodes if online is not None and n not in online]
        if missing:
            names = ", ".join(map(str, missing))
            return f"node {names} does not exist on this machine (online NUMA nodes: {format_cpulist(online)})"
        return f"mbind rejected nodes {list(nodes)}: not allowed to this process (cpuset) or without memory"
    if err == errno.EFAULT:
        return f"mbind: the range {where} is not fully mapped in this process"
    if err == errno.EPERM:
        return "mbind was refused (EPERM): a seccomp policy or missing CAP_SYS_NICE blocks it here"
    if err == errno.EIO and strict:
        return f"mbind strict: some pages of {where} could not be moved to nodes {list(nodes)}"
    if err == errno.ENOMEM:
        return f"mbind: the kernel ran out of memory applying the policy to {where}"
    if err == errno.ENOSYS:
        return "mbind: this kernel has no NUMA support"
    return f"mbind on {where} to nodes {list(nodes)} failed: {os.strerror(err)}"


def bind_memory(addr: int, nbytes: int, nodes: Sequence[int], interleave: bool = False, strict: bool = False) -> None:
    """Bind (or interleave) the pages of [addr, addr+nbytes) to `nodes`; strict moves pages already there."""
    page = mmap.PAGESIZE
    if addr % page or nbytes % page:
        raise ValueError(f"bind_memory needs a page-aligned range ({page} bytes): got addr {addr:#x}, nbytes {nbytes}")
    if nbytes <= 0:
        raise ValueError(f"bind_memory needs nbytes > 0, got {nbytes}")
    if not nodes or any(n < 0 for n in nodes):
        raise ValueError(f"bind_memory needs one or more non-negative node ids, got {list(nodes)}")
    mask, maxnode = _nodemask(nodes)
    flags = MPOL_MF_MOVE | MPOL_MF_STRICT if strict else 0
    _syscall_number("mbind")  # an unknown architecture fails here, before errno is interpreted
    try:
        _syscall("mbind", ctypes.c_void_p(addr), ctypes.c_ulong(nbytes),
                 ctypes.c_int(MPOL_INTERLEAVE if interleave else MPOL_BIND), mask,
                 ctypes.c_ulong(maxnode), ctypes.c_uint(flags))
    except OSError as e:
        raise OSError(e.errno, _explain(e.errno, addr, nbytes, nodes, strict)) from None


@dataclass(frozen=True)
class MemoryPolicy:
    mode: str  # one of MPOL_MODES
    nodes: tuple[int, ...]


def memory_policy_nodes(addr: int) -> MemoryPolicy:
    """The policy (mode and node set) that governs the page at `addr`, via get_mempolicy(MPOL_F_ADDR)."""
    mode = ctypes.c_int(-1)
    mask = (ctypes.c_ulong * (_READBACK_BITS // 64))()
    _syscall("get_mempolicy", ctypes.byref(mode), mask, ctypes.c_ulong(_READBACK_BITS + 1),
             ctypes.c_void_p(addr), ctypes.c_ulong(MPOL_F_ADDR))
    nodes = tuple(w * 64 + b for w in range(len(mask)) for b in range(64) if mask[w] >> b & 1)
    base = mode.value & ~_MODE_FLAGS
    return MemoryPolicy(MPOL_MODES[base] if base < len(MPOL_MODES) else f"mode {base}", nodes)


def page_node(addr: int) -> int:
    """The node the page at `addr` lives on (touch it with a write first, or the zero page answers)."""
    node = ctypes.c_int(-1)
    _syscall("get_mempolicy", ctypes.byref(node), None, ctypes.c_ulong(0),
             ctypes.c_void_p(addr), ctypes.c_ulong(MPOL_F_NODE | MPOL_F_ADDR))
    return node.value


# --- emulated tier bandwidth ------------------------------------------------------------------

class BandwidthCap:
    """Copies that take at least nbytes / bytes_per_s: a slow tier on a one-node machine."""

    def __init__(self, bytes_per_s: float | None):
        if bytes_per_s is not None and not bytes_per_s > 0:
            raise ValueError(f"bytes_per_s must be > 0 or None (no cap), got {bytes_per_s}")
        self.bytes_per_s = bytes_per_s
        self.emulated = bytes_per_s is not None

    def copy_(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if dst.shape != src.shape:
            raise ValueError(f"BandwidthCap.copy_ needs equal shapes, got dst {tuple(dst.shape)} and src {tuple(src.shape)}")
        start = time.perf_counter()
        dst.copy_(src)
        if not self.emulated:
            return
        for t in (dst, src):
            if t.is_cuda:  # the copy may still be in flight; time the transfer, not the launch
                torch.cuda.synchronize(t.device)
        wait = src.numel() * src.element_size() / self.bytes_per_s - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
