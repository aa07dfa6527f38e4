"""The process stays at its plan (issue 24): what the plan counts against what a step in steady state holds.

A step after the first is measured: torch AdamW makes its moments in the first optimizer step, so only from the
second on is the state the plan counts in every row there. The steps run as the dry run runs one (the real
runtime on meta and fake tensors, every storage counted by LiveBytes): fast at any size, and what the device
holds at each of the plan's rows, from the op its position starts at to the next one's.
"""

from __future__ import annotations

import pytest
import torch

from longtune.planner.timeline import positions
from longtune.trainer.capacities import load_machine, profile_capacities
from longtune.trainer.config import load_config
from longtune.trainer.planning import plan_memory

GB = 1e9
# SmolLM2-135M's shape (tied embeddings, a 49152-token vocabulary), 6 layers, fp32: the state is most of a row.
SMOLLM2_LIKE = ["model.config.hidden_size=576", "model.config.intermediate_size=1536",
                "model.config.num_hidden_layers=6", "model.config.num_attention_heads=9",
                "model.config.num_key_value_heads=3", "model.config.vocab_size=49152",
                "model.config.tie_word_embeddings=true", "model.dtype=float32", "train.mixed_precision=\"no\"",
                "model.kernels.rmsnorm=false", "model.kernels.rope=false", "model.kernels.swiglu=false",
                "model.kernels.ce_chunk_tokens=null", "data.seq_len=1024", "memory.optimizer=gpu",
                "memory.params=gpu", "memory.budget_gb=70"]


def steady_rows(cfg, plan, steps: int = 2) -> list[tuple[str, float, int]]:
    """(position, the plan's row, the device bytes alive at most over that position's ops in the last of `steps`
    steps), as trainer/dry_run.py measures one step; the backward of layer 0 to the end of the backward (the
    embeddings' included). Not the optimizer step: on fake tensors torch AdamW is its single-tensor form, which
    makes two temporaries of the largest weight, where a run's fused AdamW (CPU and CUDA) makes none."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from longtune.offload.live_bytes import LiveBytes
    from longtune.trainer.dry_run import GPU, _make_fake, _mark_backward_starts
    from longtune.trainer.memory import build_runtime
    from longtune.trainer.model import build_model, patch_model

    with torch.device(GPU):
        model = build_model(cfg.model, uninitialised=True)
    counter = LiveBytes(record=True)
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        _make_fake(model, fake)
        counter.adopt([*model.parameters(), *model.buffers()])
    with fake, counter:
        patch_model(model, cfg)
        runtime = build_runtime(cfg, model, plan, torch.device(GPU))
        try:
            for _ in range(steps):
                starts: dict[int, int] = {}
                marks = _mark_backward_starts(model, counter, starts)
                ids = torch.zeros(1, cfg.data.seq_len, dtype=torch.long, device=GPU)
                with runtime.step(1):
                    out = model(input_ids=ids, position_ids=torch.zeros_like(ids), labels=ids,
                                num_items_in_batch=ids.numel(), use_cache=False)
                    out.loss.backward()
                    del out
                backward_end = counter.ops
                runtime.clip_and_step()
                runtime.zero_grad()
                for mark in marks:
                    mark.remove()
        finally:
            runtime.close()
    L = plan.problem.num_layers
    xs = [starts[j] for j in [-1, *reversed(range(L))]] + [backward_end]
    rows = plan.evaluation().gpu_rows
    out = []
    for name, start, stop, row in zip(positions(L), xs, xs[1:], rows):
        live = [b.get(GPU, 0) for op, b in counter.samples if start <= op < stop]
        out.append((name, row, max(live)))
    return out


def _plan(overrides, tmp_path):
    cfg = load_config("llama3-8b-128k", overrides + [f"run.output_dir={tmp_path}"])
    machine = load_machine(cfg.memory.machine)
    return cfg, plan_memory(cfg, profile_capacities(cfg, machine, 1), machine, activations=True)


@pytest.mark.parametrize("placement", ["memory.optimizer=gpu", "memory.optimizer=cpu"])
def test_each_row_holds_what_a_step_after_the_first_does(tmp_path, placement):
    """The optimizer on the device, one micro-batch: a gradient is alive from the backward that makes it (none at
    the head, the LM head's from the last layer's backward, a layer's from its own), and the fp32 head's weight
    gradient is one fp32 buffer. The plan counted every gradient in every row and the head's twice (8 bytes an
    element for an fp32 model): its head row was 0.36 GB (35%) over what the step holds.
    The optimizer on the host, tied embeddings: the head row counted the head's gradient beside the loss's weight
    gradient, which is the same tensor (0.11 GB, 17% over)."""
    cfg, plan = _plan([o for o in SMOLLM2_LIKE if not o.startswith("memory.optimizer")] + [placement], tmp_path)
    assert plan.optimizer_tier == placement.split("=")[1]
    rows = steady_rows(cfg, plan)
    seen = [(name, round(planned / GB, 4), round(measured / GB, 4)) for name, planned, measured in rows]
    # every row an upper bound; tight at the head; the backward of layer 0 bounds the embeddings' backward too,
    # which comes after it
    assert all(measured <= planned * 1.001 for _, planned, measured in rows), seen
    assert rows[0][2] == pytest.approx(rows[0][1], rel=0.01), seen
    if plan.optimizer_tier == "gpu":  # and in each layer's backward (its workspace a little over)
        assert all(measured == pytest.approx(planned, rel=0.03) for _, planned, measured in rows[1:-1]), seen
    # (off the device a row also holds the gradient before it while its copy may run, which here is done at once)


def test_with_accumulation_every_gradient_counts_in_every_row(tmp_path):
    """From the second micro-batch on every gradient is alive: the rows keep them whole (as a data-parallel
    strategy's buckets do)."""
    one = _plan(SMOLLM2_LIKE, tmp_path / "one")[1].problem.state(None)
    two = _plan(SMOLLM2_LIKE + ["train.grad_accum_steps=2"], tmp_path / "two")[1].problem.state(None)
    assert two.gpu_rows == () and one.gpu_rows
    whole = sum(two.gpu_bytes.values())
    assert max(one.gpu_rows) >= whole  # the backward of layer 0 (and the embeddings'): every gradient
    assert whole - one.gpu_rows[0] == pytest.approx(one.gpu_bytes["grads"], rel=1e-9)  # the head: none of them


def _cached_fraction(path) -> float:
    """The share of a file's pages in the page cache (mincore over a private mapping: no page is read in)."""
    import ctypes
    import mmap
    import os

    from longtune.offload.pinned import _resident

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        buf = (ctypes.c_char * size).from_buffer(mm)
        try:
            return _resident(ctypes.addressof(buf), size) / size
        finally:
            del buf
    finally:
        mm.close()


def test_without_o_direct_the_nvme_tier_leaves_no_pages_in_the_page_cache(tmp_path):
    """Buffered NVMe files (a filesystem refusing O_DIRECT): the page cache is charged to the process's cgroup as its
    own memory, so written and read pages are dropped (they stayed: all 16 MB cached after the write and the read)."""
    import subprocess

    from longtune.offload.nvme import NvmeStore

    kind = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    if kind in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {kind}: its files are memory")
    t = torch.arange(4 << 20, dtype=torch.float32)  # 16 MB
    with NvmeStore(tmp_path / "nvme", direct="off", backend="threads") as store:
        assert not store.direct_io
        store.write("k", t)
        (path,) = [p for p in store.path.iterdir() if p.name.endswith(".swp")]
        assert _cached_fraction(path) < 0.05
        out = torch.empty_like(t)
        store.read("k", out)
        assert torch.equal(out, t)
        assert _cached_fraction(path) < 0.05


_RETAINED = """
import sys, torch
from longtune.trainer.memory import steady_allocator
if sys.argv[1] == "steady":
    assert steady_allocator()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
x = torch.ones(16 << 20, dtype=torch.uint8)
del x  # a 16 MB block freed: glibc's mmap threshold rises to it
before = rss()
xs = [torch.ones(1 << 20) for _ in range(64)]  # 64 buffers of 4 MB
del xs[::2]  # half of them freed, between the others
print((rss() - before) / 1e6 - 32 * 4.194304)  # MB the process holds beyond the 32 alive
"""


def test_the_trainer_keeps_glibc_from_holding_freed_buffers(tmp_path):
    """glibc's default: past a freed 16 MB block, 4 MB buffers come from the heap and stay when freed (the half
    freed here, 134 MB, stayed); with the threshold fixed (trainer/memory.steady_allocator, called by build_runtime)
    they go back to the OS. Each case in a fresh process, without the bench's MALLOC_* settings."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONSAFEPATH"] = "1"
    held = {}
    for mode in ("default", "steady"):
        out = subprocess.run([sys.executable, "-c", _RETAINED, mode], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        held[mode] = float(out.stdout.split()[-1])
    assert held["default"] > 100, held  # the freed half, kept
    assert held["steady"] < 10, held


def test_the_baseline_is_the_process_less_the_weights_and_the_host_pools_pages():
    """trainer/memory.baseline_bytes: the process's memory less what the plan counts that is already there, the
    weights in host memory (tied ones once) and the host pools' pages in memory (touched, or all of a pinned
    pool), never a pool's untouched pages nor a tensor viewing a pool twice."""
    from longtune.offload.pinned import HostPool, resident_bytes
    from longtune.trainer.memory import baseline_bytes, process_memory_bytes

    model = torch.nn.Sequential(torch.nn.Embedding(2048, 1024), torch.nn.Linear(1024, 2048, bias=False))
    model[1].weight = model[0].weight  # tied: 8 MB once
    with HostPool([("touched", (8 << 20,), torch.uint8), ("untouched", (64 << 20,), torch.uint8)], pin="off") as pool:
        before = resident_bytes()
        pool.tensor("touched").fill_(1)
        assert resident_bytes() - before == 8 << 20
        model.register_buffer("in_pool", pool.tensor("touched")[: 1 << 20])  # a pool's bytes, counted as the pool's
        memory, _ = process_memory_bytes()
        outside, _ = baseline_bytes(model)
    # the weights (8 MB, once) and the pools' pages in memory (this one's 8 MB touched, and any other live pool's)
    assert memory - outside == pytest.approx((8 << 20) + (8 << 20) + before, abs=2 << 20)
