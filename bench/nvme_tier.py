"""Sequential write and read bandwidth of the NVMe store against fio on the same folder.

    python bench/nvme_tier.py                                  # 2 GiB in 64 MiB tensors under ./.bench-tmp
    python bench/nvme_tier.py --dir /nvme/scratch --size-gib 8 --workers 8 --backend aio --block-mib 1

The store writes the whole working set with every request in flight, waits, drops the page cache (when
permitted: root and a writable /proc/sys/vm/drop_caches) and reads it all back the same way, checksums
on. Two kinds of source tensors: page-aligned ones (`page_aligned_empty`, moved with O_DIRECT in place)
and plain torch tensors (64 bytes into a page, so with O_DIRECT every piece goes through staging).
fio then does a sequential write and read of the same size with the same parallelism (one job at queue
depth = workers with libaio, or `workers` jobs at depth 1 with psync; --direct=1 when the store used
O_DIRECT), at the store's piece size and at 1 MiB, and the better of the two counts. Store and fio
take turns --rounds times (a shared or virtual disk varies a lot from minute to minute): the best of
each, and the median over rounds of the store/fio ratio within a round, are printed (the goal is
>= 0.8); all of it, every round too, goes with the machine, date, commit and command to
bench/results/nvme_tier-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from longtune.offload.nvme import DEFAULT_BLOCK_BYTES, NvmeStore, page_aligned_empty
from longtune.bench.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def drop_page_cache() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def time_store(store: NvmeStore, tensors: list[torch.Tensor], tag: str) -> tuple[float, float, bool]:
    """Seconds to write all tensors, seconds to read them back, and whether the page cache was dropped between."""
    start = time.perf_counter()
    for f in [store.write_async(f"{tag}{i}", t) for i, t in enumerate(tensors)]:
        f.result()
    write_s = time.perf_counter() - start
    dropped = drop_page_cache()
    start = time.perf_counter()
    # reading into the tensors that were written: checksums prove the bytes, and no second working set is needed
    for f in [store.read_async(f"{tag}{i}", t) for i, t in enumerate(tensors)]:
        f.result()
    read_s = time.perf_counter() - start
    for i in range(len(tensors)):
        store.delete(f"{tag}{i}")
    return write_s, read_s, dropped


def run_fio(folder: Path, rw: str, total: int, block: int, workers: int, direct: bool, engine: str) -> float:
    """Bandwidth in bytes/s of one fio sequential pass."""
    jobs, depth = (1, workers) if engine == "libaio" else (workers, 1)
    cmd = ["fio", "--name=longtune-seq", f"--directory={folder}", f"--rw={rw}", f"--bs={block}",
           f"--size={total // jobs}", f"--numjobs={jobs}", f"--iodepth={depth}", f"--ioengine={engine}",
           f"--direct={int(direct)}", "--group_reporting", "--output-format=json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout[done.stdout.index("{"):])
    return report["jobs"][0]["read" if rw == "read" else "write"]["bw_bytes"]


def fio_engine() -> str:
    done = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True)
    return "libaio" if "libaio" in done.stdout else "psync"


def describe_folder(folder: Path) -> str:
    done = subprocess.run(["df", "--output=source,fstype,size", str(folder)], capture_output=True, text=True)
    lines = done.stdout.split("\n")
    return " ".join(lines[1].split()) if done.returncode == 0 and len(lines) > 1 else "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(REPO / ".bench-tmp"), help="folder on the device to measure (created, then removed)")
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--tensor-mib", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--block-mib", type=int, default=DEFAULT_BLOCK_BYTES >> 20, help="the store's piece size (its default)")
    ap.add_argument("--staging-buffers", type=int, default=4)
    ap.add_argument("--backend", default="auto", choices=["auto", "threads", "aio"])
    ap.add_argument("--direct", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--rounds", type=int, default=5, help="store and fio take turns this many times")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    folder = Path(args.dir)
    created = not folder.exists()
    count = max(1, round(args.size_gib * 1024 / args.tensor_mib))
    tensor_bytes, block = args.tensor_mib << 20, args.block_mib << 20
    fio_blocks = sorted({block, 1 << 20})  # fio at its own best: the store's piece size and the customary 1 MiB
    total = count * tensor_bytes
    engine = fio_engine() if shutil.which("fio") else None
    if engine is None:
        print("fio not found: apt-get install fio (printing the store's figures alone)")
    rounds, dropped_all = [], True
    try:
        store = NvmeStore(folder, backend=args.backend, direct=args.direct, workers=args.workers,
                          block_bytes=block, staging_buffers=args.staging_buffers)
        print(f"store: backend {store.backend_name}, O_DIRECT {'on' if store.direct_io else 'off'}, {args.workers} workers, "
              f"{args.block_mib} MiB pieces, {count} x {args.tensor_mib} MiB = {total / GIB:.2f} GiB at {folder} "
              f"({describe_folder(folder)})", flush=True)
        # random bytes (so no layer below can compress or dedupe them), different in every tensor
        pattern = torch.randint(-2**62, 2**62, (tensor_bytes // 8,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
        with store:
            direct_io, backend = store.direct_io, store.backend_name
            for round_index in range(args.rounds):  # store and fio take turns, so a busy spell hits both alike
                figures = {}
                for kind in ("page-aligned", "torch"):
                    # one working set at a time keeps peak memory at size-gib
                    make = page_aligned_empty if kind == "page-aligned" else torch.empty
                    tensors = [make(tensor_bytes, dtype=torch.uint8) for _ in range(count)]
                    for i, t in enumerate(tensors):
                        t.view(torch.int64).copy_(pattern).add_(i * 0x9E3779B97F4A7C1 % 2**62)
                    write_s, read_s, dropped = time_store(store, tensors, kind)
                    dropped_all &= dropped
                    figures[f"store ({kind} tensors)"] = (total / write_s / 1e9, total / read_s / 1e9)
                    del tensors
                if engine is not None:
                    fio_dir = folder / "fio"
                    fio_dir.mkdir()
                    try:
                        write_bw = read_bw = 0.0
                        for fio_block in fio_blocks:
                            write_bw = max(write_bw, run_fio(fio_dir, "write", total, fio_block, args.workers, direct_io, engine))
                            dropped_all &= drop_page_cache()
                            read_bw = max(read_bw, run_fio(fio_dir, "read", total, fio_block, args.workers, direct_io, engine))
                            for old in fio_dir.iterdir():
                                old.unlink()
                    finally:
                        shutil.rmtree(fio_dir, ignore_errors=True)
                    depth = f"qd {args.workers}" if engine == "libaio" else f"{args.workers} jobs"
                    bs = "bs " + " or ".join(f"{b >> 20} MiB" for b in fio_blocks)
                    figures[f"fio ({engine}, {depth}, {bs})"] = (write_bw / 1e9, read_bw / 1e9)
                rounds.append(figures)
                print(f"round {round_index + 1}: " + ", ".join(f"{k} {w:.2f}/{r:.2f}" for k, (w, r) in figures.items())
                      + " GB/s write/read", flush=True)
            staging_peak = store.max_staging_bytes_used
    finally:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
    # the best write and the best read of each row over the rounds
    rows = [{"what": what, "write_GBps": max(r[what][0] for r in rounds), "read_GBps": max(r[what][1] for r in rounds)}
            for what in rounds[0]]
    if engine is not None:
        fio_row = rows[-1]
        for row in rows[:-1]:
            row["write_vs_fio"] = row["write_GBps"] / fio_row["write_GBps"]
            row["read_vs_fio"] = row["read_GBps"] / fio_row["read_GBps"]
            # A shared or virtual disk drifts by 2x within minutes: the ratio within each round, store and
            # fio back to back, is the steadier figure; its median over the rounds is reported beside the best.
            for k, way in enumerate(("write", "read")):
                per_round = [r[row["what"]][k] / r[fio_row["what"]][k] for r in rounds]
                row[f"{way}_vs_fio_per_round"] = per_round
                row[f"{way}_vs_fio_median"] = statistics.median(per_round)
    print(f"page cache dropped between write and read: {'yes' if dropped_all else 'no (needs root)'}")
    print(f"best of {f'{args.rounds} rounds':<29} {'write GB/s':>10} {'read GB/s':>10} {'write/fio':>10} {'read/fio':>10}"
          f" {'median of round ratios':>24}")
    for row in rows:
        ratios = (f"{row['write_vs_fio']:10.2f} {row['read_vs_fio']:10.2f} {row['write_vs_fio_median']:11.2f} "
                  f"{row['read_vs_fio_median']:11.2f}" if "write_vs_fio" in row else "")
        print(f"{row['what']:37} {row['write_GBps']:10.2f} {row['read_GBps']:10.2f} {ratios}")
    date = datetime.date.today().isoformat()
    commit = git_commit()
    out = Path(args.out or REPO / "bench" / "results" / f"nvme_tier-{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": f"CPU: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores; "
                  f"disk: {describe_folder(folder.parent if created else folder)}",
        "date": date, "commit": commit, "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "backend": backend, "direct_io": direct_io, "page_cache_dropped": dropped_all, "working_set_bytes": total,
        "tensor_bytes": tensor_bytes, "block_bytes": block, "workers": args.workers, "staging_peak_bytes": staging_peak,
        "rows": rows, "rounds": [{k: {"write_GBps": w, "read_GBps": r} for k, (w, r) in fig.items()} for fig in rounds],
    }, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
