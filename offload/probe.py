"""`longtune probe`: measure this machine's tiers and write the machine profile the planner reads.

Each figure goes through the path the runtime uses: host copies from a `HostPool`
(pinned when a GPU exists), NVMe through an `NvmeStore` (same backend, O_DIRECT
and checksums as training), CXL from a pool bound to the CXL node. Without a
GPU the "GPU" is the CPU: copy figures are host memcpy and the profile says so.
"""

from __future__ import annotations

import platform
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import psutil
import torch

from .numa import BandwidthCap, cxl_nodes, describe, local_nodes, read_nodes
from .pinned import HostPool

GB = 1e9
MiB = 1 << 20


def _best_seconds(fn: Callable[[], None], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()  # warm-up: page faults, pinning, kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def copy_bandwidth(device: torch.device, nbytes: int, numa_nodes=None, cap: Optional[BandwidthCap] = None,
                   repeats: int = 3) -> dict[str, float]:
    """GB/s each way between a host pool (bound to `numa_nodes`) and `device` (or host memory on a CPU)."""
    n = nbytes // 4
    with HostPool([("buf", (n,), torch.float32)], numa_nodes=numa_nodes, name="probe") as pool:
        host = pool.tensor("buf")
        host.fill_(1.0)
        dev = torch.empty(n, dtype=torch.float32, device=device)
        copy = cap.copy_ if cap is not None else (lambda dst, src: dst.copy_(src, non_blocking=True))
        sync = _sync(device)
        to_dev = _best_seconds(lambda: copy(dev, host), repeats, sync)
        from_dev = _best_seconds(lambda: copy(host, dev), repeats, sync)
    return {"to_gpu_gbps": round(nbytes / to_dev / GB, 2), "from_gpu_gbps": round(nbytes / from_dev / GB, 2)}


def nvme_bandwidth(path: str, nbytes: int, backend: str = "auto", tensor_bytes: int = 64 * MiB) -> dict:
    """Sequential write then read of `nbytes` through the NVMe tier's own store (all requests in flight)."""
    from .nvme import NvmeStore

    count = max(1, nbytes // tensor_bytes)
    with NvmeStore(path, backend=backend) as store:
        data = [torch.full((tensor_bytes,), i % 251, dtype=torch.uint8) for i in range(count)]
        start = time.perf_counter()
        for f in [store.write_async(f"probe-{i}", t) for i, t in enumerate(data)]:
            f.result()
        write_s = time.perf_counter() - start
        dropped = _drop_page_cache()  # else a buffered read measures RAM, not the drive
        start = time.perf_counter()
        for f in [store.read_async(f"probe-{i}", t) for i, t in enumerate(data)]:
            f.result()
        read_s = time.perf_counter() - start
        total = count * tensor_bytes
        return {"write_gbps": round(total / write_s / GB, 2), "read_gbps": round(total / read_s / GB, 2),
                "backend": store.backend_name, "direct_io": store.direct_io, "page_cache_dropped": dropped}


def _drop_page_cache() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 3) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = _best_seconds(lambda: a @ b, repeats, _sync(device))
    return 2 * size**3 / seconds / 1e12


def attention_tflops(device: torch.device, dtype: torch.dtype, tokens: int, heads: int = 8, head_dim: int = 128) -> float:
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
    attend = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    seconds = _best_seconds(attend, 3, _sync(device))
    return 2 * 2 * tokens * tokens * heads * head_dim / 2 / seconds / 1e12  # QK^T and AV over half the square


def probe(nvme_path: Optional[str] = None, size_mb: int = 1024, emulate_cxl_gbps: Optional[float] = None,
          nvme_backend: str = "auto", log: Callable[[str], None] = print) -> dict:
    """The machine profile as a dict (the planner's `Machine` format plus what was measured and how)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    nbytes = size_mb * MiB
    nodes = read_nodes()
    log(describe(nodes))
    local = local_nodes(nodes)[0].id if local_nodes(nodes) else 0
    if cuda:
        free, _ = torch.cuda.mem_get_info(device)
        gpu = {"name": torch.cuda.get_device_name(device), "memory_gb": round(free / GB, 1)}
        mm, attn_tokens, dtype = 8192, 8192, torch.bfloat16
    else:
        gpu = {"name": f"cpu ({platform.processor() or platform.machine()}, {psutil.cpu_count()} cores)",
               "memory_gb": round(psutil.virtual_memory().available / GB, 1)}
        mm, attn_tokens, dtype = 1024, 1024, torch.float32  # CPU bf16 matmul is emulated: fp32 is what it runs
    log(f"measuring {'bf16' if cuda else 'fp32'} matmul and attention on {gpu['name']} ...")
    peak = matmul_tflops(device, dtype, mm)
    attn = attention_tflops(device, dtype, attn_tokens)
    gpu.update({"bf16_tflops": round(peak, 3), "matmul_dtype": str(dtype).removeprefix("torch."),
                "matmul_efficiency": 1.0,  # measured: achieved, not datasheet, FLOPS
                "attention_efficiency": round(min(attn / peak, 1.0), 3)})
    log(f"measuring host {'<-> GPU' if cuda else 'memcpy'} bandwidth over {size_mb} MiB (NUMA node {local}) ...")
    tiers = {"host": {"capacity_gb": round(psutil.virtual_memory().available / GB, 1),
                      **copy_bandwidth(device, nbytes, [local]), "numa_nodes": [local]}}
    if not cuda:  # the device's memory is host RAM: its bandwidth is memcpy's (what the AdamW step on it streams);
        # and the device's cores are the host's: a copy, a read from the disk or a host optimizer step takes its
        # time from the compute, not beside it
        gpu["hbm_gbps"] = min(tiers["host"]["to_gpu_gbps"], tiers["host"]["from_gpu_gbps"])
        gpu["overlaps_transfers"] = False
    cxl = cxl_nodes(nodes)
    if cxl:
        ids = [n.id for n in cxl]
        log(f"measuring CXL nodes {ids} ...")
        tiers["cxl"] = {"capacity_gb": round(sum(n.free_bytes for n in cxl) / GB, 1),
                        **copy_bandwidth(device, nbytes, ids), "numa_nodes": ids, "emulated": False}
    elif emulate_cxl_gbps:
        log(f"no CXL node: emulating a cxl tier on node {local} capped at {emulate_cxl_gbps} GB/s")
        tiers["cxl"] = {"capacity_gb": 0.0, **copy_bandwidth(device, nbytes, [local], BandwidthCap(emulate_cxl_gbps * GB)),
                        "numa_nodes": [local], "emulated": True}
    if nvme_path:
        log(f"measuring the NVMe tier at {nvme_path} over {size_mb} MiB ...")
        disk = nvme_bandwidth(nvme_path, nbytes, nvme_backend)
        import shutil

        host = tiers["host"]
        tiers["nvme"] = {"capacity_gb": round(shutil.disk_usage(nvme_path).free / GB, 1),
                         # to the GPU the drive's stream also crosses the host link: the slower of the two
                         "to_gpu_gbps": min(disk["read_gbps"], host["to_gpu_gbps"]),
                         "from_gpu_gbps": min(disk["write_gbps"], host["from_gpu_gbps"]),
                         "path": str(Path(nvme_path).absolute()), **disk}
    return {
        "name": f"probed-{socket.gethostname()}",
        "measured": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": str(torch.__version__),
                     "device": gpu["name"], "size_mb": size_mb},
        "gpu": gpu,
        "tiers": tiers,
    }
