"""The NVMe tier on real files: round trips, concurrency, atomic replace, checksums, disk full, O_DIRECT."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from longtune.offload.nvme import ALIGN, NvmeError, NvmeStore, aio_is_built, page_aligned_empty

KIB = 1024
SHAPES = [
    (torch.float32, (1000,)),
    (torch.bfloat16, (3, 5, 7)),            # 210 bytes: one odd tail piece
    (torch.float16, (3 * 64 * KIB + 11,)),  # several pieces plus an odd tail
    (torch.int64, (0,)),
    (torch.float64, ()),
    (torch.uint8, (4 * ALIGN,)),            # exactly aligned: no staging needed when the address is aligned
    (torch.int8, (777, 3)),
    (torch.bool, (4097,)),
]


def sample(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=g, dtype=dtype)


def unaligned(n: int, seed: int = 0) -> torch.Tensor:
    """A contiguous uint8 tensor whose address is one byte past a page boundary."""
    return sample(torch.uint8, (n + 1,), seed)[1:]


def key_files(store: NvmeStore) -> list[Path]:
    return sorted(store.path.iterdir())


@contextmanager
def mounted(fstype: str, target: Path, options: str | None = None):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(f"mounting a {fstype} needs root and the mount command")
    target.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", fstype, *(["-o", options] if options else []), fstype, str(target)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {fstype} here: {done.stderr.strip() or done.returncode}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


def _aio_ready() -> str | None:
    if not aio_is_built():
        return "DeepSpeed's async_io op is not built (build it once: apt-get install libaio-dev, then NvmeStore(..., backend='aio'))"
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible():
        return "DeepSpeed's async_io op is not compatible here (apt-get install libaio-dev)"
    return None


@pytest.fixture(params=["threads", "aio"])
def backend(request, tmp_path) -> str:
    """Each backend in turn; aio only where its op is already built (CI never spends minutes compiling it)."""
    if request.param == "aio":
        reason = _aio_ready()
        if reason:
            pytest.skip(reason)
        if not direct_supported(tmp_path):
            pytest.skip(f"{tmp_path} refuses O_DIRECT, which DeepSpeed's aio op always uses")
    return request.param


def direct_supported(folder: Path) -> bool:
    with NvmeStore(folder, direct="auto") as store:
        return store.direct_io


@pytest.mark.parametrize("direct", ["auto", "off"])
def test_round_trip_dtypes_shapes_and_odd_sizes(tmp_path, direct):
    with NvmeStore(tmp_path, direct=direct, backend="threads", block_bytes=64 * KIB) as store:
        assert store.backend_name == "threads"
        tensors = {f"t{i}": sample(dtype, shape, i) for i, (dtype, shape) in enumerate(SHAPES)}
        tensors["unaligned"] = unaligned(3 * 64 * KIB + 123)
        for key, t in tensors.items():
            store.write(key, t)
        assert store.keys() == sorted(tensors)
        for key, t in tensors.items():
            assert key in store and store.nbytes(key) == t.numel() * t.element_size()
            out = torch.empty_like(t)
            if out.numel():
                out.fill_(0 if t.dtype == torch.bool else 7)
            store.read(key, out)
            assert torch.equal(out, t), key
        # O_DIRECT pads every file to whole pages; buffered files hold the same padded layout
        assert all(f.stat().st_size % ALIGN == 0 for f in key_files(store))


def test_many_concurrent_writes_and_reads_including_read_after_unfinished_write(tmp_path, backend):
    with NvmeStore(tmp_path, backend=backend, workers=4, block_bytes=16 * KIB, staging_buffers=3) as store:
        tensors = {f"k{i}": (unaligned if i % 3 == 0 else lambda n, s: sample(torch.uint8, (n,), s))(1000 + 9973 * i, i)
                   for i in range(48)}
        writes = [store.write_async(k, t) for k, t in tensors.items()]
        outs = {k: torch.zeros_like(t) for k, t in tensors.items()}
        # issued before the writes finish: each read must wait for its key's write and see it
        reads = [store.read_async(k, outs[k]) for k in tensors]
        for f in writes + reads:
            assert f.result(timeout=60) is None
        for k, t in tensors.items():
            assert torch.equal(outs[k], t), k
        assert len(key_files(store)) == len(tensors)  # no temporary file left behind


def test_overwrite_keeps_the_newest_version(tmp_path):
    with NvmeStore(tmp_path, block_bytes=16 * KIB) as store:
        store.write("w", sample(torch.float32, (5000,), 1))
        newest = sample(torch.bfloat16, (333,), 2)
        store.write("w", newest)
        out = torch.empty_like(newest)
        store.read("w", out)
        assert torch.equal(out, newest) and store.nbytes("w") == 666
        # several versions in flight at once: the last one issued wins
        versions = [sample(torch.float32, (20000,), s) for s in range(6)]
        futures = [store.write_async("w", v) for v in versions]
        for f in futures:
            f.result(timeout=60)
        out = torch.empty_like(versions[-1])
        store.read("w", out)
        assert torch.equal(out, versions[-1])
        assert len(key_files(store)) == 1


def test_delete_forgets_the_key_and_removes_its_file(tmp_path):
    with NvmeStore(tmp_path) as store:
        store.write("a", sample(torch.float32, (100,)))
        store.write("b", sample(torch.float32, (100,)))
        store.delete("a")
        assert "a" not in store and store.keys() == ["b"] and len(key_files(store)) == 1
        with pytest.raises(KeyError, match="'a'"):
            store.read("a", torch.empty(100))
        with pytest.raises(KeyError, match="'a'"):
            store.delete("a")


def test_close_removes_the_stores_files_and_refuses_more_work(tmp_path):
    other = NvmeStore(tmp_path)
    with NvmeStore(tmp_path) as store:
        assert store.path.parent == tmp_path and store.path != other.path  # two stores never share files
        store.write("a", sample(torch.float32, (10000,)))
        path = store.path
        assert any(path.iterdir())
    assert not path.exists() and other.path.exists()
    with pytest.raises(ValueError, match="closed"):
        store.write("a", torch.zeros(3))
    store.close()  # a second close is harmless
    other.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend, direct", [("threads", "auto"), ("threads", "off"), ("aio", "on")], indirect=["backend"])
def test_a_flipped_byte_on_disk_is_an_error_not_wrong_numbers(tmp_path, backend, direct):
    with NvmeStore(tmp_path, backend=backend, direct=direct, block_bytes=16 * KIB) as store:
        t = sample(torch.float32, (30000,))
        store.write("w", t)
        (file,) = key_files(store)
        with open(file, "r+b") as f:
            f.seek(50000)
            byte = f.read(1)
            f.seek(50000)
            f.write(bytes([byte[0] ^ 0x01]))
        with pytest.raises(NvmeError, match=r"checksum mismatch for key 'w' in .*\.swp"):
            store.read("w", torch.empty_like(t))


def test_a_truncated_file_is_a_short_read(tmp_path, backend):
    with NvmeStore(tmp_path, backend=backend) as store:
        t = sample(torch.float32, (30000,))
        store.write("w", t)
        (file,) = key_files(store)
        os.truncate(file, 40000)
        with pytest.raises(NvmeError, match="short read of key 'w'.*40000 bytes"):
            store.read("w", torch.empty_like(t))


def test_disk_full_on_a_real_tiny_tmpfs(tmp_path, backend):
    with mounted("tmpfs", tmp_path / "tiny", "size=1m") as tiny, NvmeStore(tiny, backend=backend, block_bytes=64 * KIB) as store:
        small = sample(torch.float32, (25000,))  # 100 KB
        store.write("small", small)
        store.write("grown", small)
        for key in ("big", "grown"):  # a new key, and a bigger version of an existing one
            with pytest.raises(NvmeError, match=r"disk full at .*tiny: needed 2\d{6} bytes, \d+ free") as info:
                store.write(key, sample(torch.float32, (1 << 19,)))  # 2 MiB
            assert isinstance(info.value, OSError)
        assert "big" not in store
        assert not [f for f in key_files(store) if f.name.endswith(".tmp")]  # the temporary file was removed
        for key in ("small", "grown"):  # what was written before the failure still reads back exactly
            out = torch.empty_like(small)
            store.read(key, out)
            assert torch.equal(out, small)


def test_a_folder_that_cannot_be_written_fails_at_construction(tmp_path):
    plain_file = tmp_path / "not-a-folder"
    plain_file.write_text("x")
    with pytest.raises(NvmeError, match="not-a-folder for the NVMe store: it is a file, not a folder"):
        NvmeStore(plain_file)
    with pytest.raises(NvmeError, match="not-a-folder/sub for the NVMe store: Not a directory"):
        NvmeStore(plain_file / "sub")
    with mounted("tmpfs", tmp_path / "ro", "size=1m") as ro:
        if subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount a tmpfs read-only here")
        with pytest.raises(NvmeError, match=r"cannot use .*ro for the NVMe store: Read-only file system"):
            NvmeStore(ro)


def test_direct_on_where_the_filesystem_refuses_o_direct(tmp_path):
    # ramfs, because tmpfs accepts O_DIRECT since Linux 6.6
    with mounted("ramfs", tmp_path / "ram") as ram:
        with pytest.raises(NvmeError, match="O_DIRECT refused at .*ram"):
            NvmeStore(ram, direct="on")
        with NvmeStore(ram, direct="auto") as store:  # auto falls back to buffered I/O
            assert store.direct_io is False and store.backend_name == "threads"
            t = unaligned(5000)
            store.write("x", t)
            out = torch.empty_like(t)
            store.read("x", out)
            assert torch.equal(out, t)
        assert list(ram.iterdir()) == []


def test_staging_memory_stays_within_its_bound(tmp_path, backend):
    if not direct_supported(tmp_path):
        pytest.skip(f"{tmp_path} refuses O_DIRECT, so nothing is staged")
    block, buffers = 16 * KIB, 2
    with NvmeStore(tmp_path, backend=backend, workers=4, block_bytes=block, staging_buffers=buffers) as store:
        tensors = {f"u{i}": unaligned(block * 5 + 17 * i, i) for i in range(24)}
        for f in [store.write_async(k, t) for k, t in tensors.items()]:
            f.result(timeout=60)
        outs = {k: torch.empty_like(t) for k, t in tensors.items()}
        for f in [store.read_async(k, outs[k]) for k in tensors]:
            f.result(timeout=60)
        assert all(torch.equal(outs[k], t) for k, t in tensors.items())
        assert 0 < store.max_staging_bytes_used <= buffers * block


def test_page_aligned_tensors_skip_staging(tmp_path):
    if not direct_supported(tmp_path):
        pytest.skip(f"{tmp_path} refuses O_DIRECT, so nothing is staged")
    t = page_aligned_empty((3, 64 * KIB), torch.float32)
    assert t.data_ptr() % ALIGN == 0 and t.shape == (3, 64 * KIB) and t.dtype == torch.float32
    t.copy_(sample(torch.float32, (3, 64 * KIB)))
    with NvmeStore(tmp_path, backend="threads", block_bytes=64 * KIB) as store:  # aio stages all but pinned memory
        store.write("a", t)
        out = page_aligned_empty(t.shape, t.dtype)
        store.read("a", out)
        assert torch.equal(out, t) and store.max_staging_bytes_used == 0
        store.write("b", t.view(-1)[1:])  # the same memory one element off the page boundary is staged
        assert store.max_staging_bytes_used > 0


def test_bad_input_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="block_bytes must be a positive multiple of 4096"):
        NvmeStore(tmp_path, block_bytes=1000)
    with pytest.raises(ValueError, match="backend must be"):
        NvmeStore(tmp_path, backend="io_uring")
    with pytest.raises(NvmeError, match="backend 'aio' needs O_DIRECT"):
        NvmeStore(tmp_path, backend="aio", direct="off")
    with NvmeStore(tmp_path) as store:
        with pytest.raises(ValueError, match="contiguous"):
            store.write("t", torch.zeros(4, 4).t())
        with pytest.raises(ValueError, match="CPU tensor"):
            store.write("t", [1, 2, 3])
        store.write("t", torch.zeros(8))
        with pytest.raises(ValueError, match="out holds 8 torch.float64 elements, the stored tensor 8 torch.float32"):
            store.read("t", torch.zeros(8, dtype=torch.float64))
        with pytest.raises(KeyError, match="'missing'"):
            store.read("missing", torch.zeros(8))



def test_aio_backend_round_trip_and_checksum(tmp_path):
    reason = _aio_ready()
    if reason:
        pytest.skip(reason)
    if not direct_supported(tmp_path):
        pytest.skip(f"{tmp_path} refuses O_DIRECT, which DeepSpeed's aio op always uses")
    # auto takes the built op only with a GPU: on the CPU the thread pool measured faster
    expected = "aio (DeepSpeed)" if torch.cuda.is_available() else "threads"
    assert NvmeStore(tmp_path / "auto").backend_name == expected
    with NvmeStore(tmp_path, backend="aio", block_bytes=64 * KIB, staging_buffers=2) as store:
        assert store.backend_name == "aio (DeepSpeed)" and store.direct_io
        tensors = {f"t{i}": sample(dtype, shape, i) for i, (dtype, shape) in enumerate(SHAPES)}
        for f in [store.write_async(k, t) for k, t in tensors.items()]:
            f.result(timeout=60)
        for key, t in tensors.items():
            out = torch.empty_like(t)
            store.read(key, out)
            assert torch.equal(out, t), key
        assert 0 < store.max_staging_bytes_used <= 2 * 64 * KIB
        file = store.path / NvmeStore._file_name("t2")
        with open(file, "r+b") as f:
            f.seek(100)
            f.write(b"\xff\xff")
        with pytest.raises(NvmeError, match="checksum mismatch for key 't2'"):
            store.read("t2", torch.empty_like(tensors["t2"]))


@pytest.mark.gpu
def test_pinned_host_tensors_round_trip_and_cuda_tensors_are_refused(tmp_path):
    with NvmeStore(tmp_path) as store:
        t = sample(torch.float32, (1 << 20,)).pin_memory()
        out = torch.empty_like(t).pin_memory()
        store.write("p", t)
        store.read("p", out)
        assert torch.equal(out, t)
        if store.direct_io and t.data_ptr() % ALIGN == 0 and out.data_ptr() % ALIGN == 0:
            assert store.max_staging_bytes_used == 0  # pinned pages go to the device in place
        with pytest.raises(ValueError, match="needs a dense CPU tensor, got a cuda:0 tensor"):
            store.write("c", t.cuda())
