"""Every Triton kernel variant the launchers can choose compiles for sm_80 and sm_90, without a GPU (kernels/aot.py).

The launchers' own argument builders, at Llama-3-8B/70B widths, vocabulary 128,256, 4K to 1M tokens, bf16/fp16/
fp32; Triton's compiler and its bundled ptxas down to the cubin. Checked per variant: it compiles, ptxas reports
no spills, shared memory within the target's limit, registers x threads within the register file, 64-bit
offsets wherever a tensor spans 2**31 elements or more, the grid within CUDA's limits. Toy kernels that break
each rule show that the checks can fail.

One child process compiles everything once (the tests' TRITON_INTERPRET=1 makes triton.jit functions that
cannot be compiled, so the child runs without it); the tests read its JSON.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed: no kernel to compile")

KERNELS = ("_ce_chunk_kernel", "_galore_update_kernel", "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel",
           "_rope_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel")
TARGETS = (80, 90)

TOYS = '''
import triton
import triton.language as tl


@triton.jit
def rows_i32(X, Y, stride, n_cols, BLOCK: tl.constexpr):  # row * stride in i32: wraps past 2**31 elements
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + row * stride + cols, mask=cols < n_cols)
    tl.store(Y + row * stride + cols, x * 2, mask=cols < n_cols)


@triton.jit
def rows_i64(X, Y, stride, n_cols, BLOCK: tl.constexpr):  # the same with the row in i64
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + row * stride + cols, mask=cols < n_cols)
    tl.store(Y + row * stride + cols, x * 2, mask=cols < n_cols)


@triton.jit
def flat_i32(X, n, BLOCK: tl.constexpr):  # program_id * BLOCK in i32
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < n) + 1, mask=offs < n)


@triton.jit
def loop_i32(X, n_rows, stride, BLOCK: tl.constexpr):  # a loop variable times a stride in i32
    cols = tl.arange(0, BLOCK)
    for r in range(0, n_rows):
        p = X + r * stride + cols
        tl.store(p, tl.load(p) + 1)


@triton.jit
def norm(X, BLOCK: tl.constexpr):  # a whole row in one warp, capped at 32 registers: spills
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, axis=0) / BLOCK)
    tl.store(X + offs, (y * x).to(X.dtype.element_ty))


@triton.jit
def matmul(A, B, C, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(A + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(B + (k + rk)[:, None] * BLOCK_N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(C + rm[:, None] * BLOCK_N + rn[None, :], acc)
'''

DRIVER = '''
import json
import sys

import torch

folder, out = sys.argv[1], sys.argv[2]
from longtune.kernels import aot

why = aot.triton_missing()
if why:
    json.dump({"skip": why}, open(out, "w"))
    sys.exit(0)
report = aot.run((80, 90), jobs=2)

sys.path.insert(0, folder)
import toys as T

m = aot._meta
big, small = m(1 << 20, 8192), m(4096, 8192)  # 2**33 and 2**25 elements
f32 = torch.float32
rows = dict(BLOCK=8192, num_warps=16)
launches = [
    aot.Launch("rows_i32 big", T.rows_i32, (1 << 20,), (big, big, 8192, 8192), rows, "bf16", "-"),
    aot.Launch("rows_i32 small", T.rows_i32, (4096,), (small, small, 8192, 8192), rows, "bf16", "-"),
    aot.Launch("rows_i64 big", T.rows_i64, (1 << 20,), (big, big, 8192, 8192), rows, "bf16", "-"),
    aot.Launch("flat_i32 big", T.flat_i32, (1 << 23,), (big, big.numel()), dict(BLOCK=1024), "bf16", "-"),
    aot.Launch("loop_i32 big", T.loop_i32, (1,), (big, 1 << 20, 8192), dict(BLOCK=8192, num_warps=16), "bf16", "-"),
    aot.Launch("norm spills", T.norm, (1,), (m(4096),), dict(BLOCK=4096, num_warps=1, maxnreg=32), "bf16", "-"),
    # 4 stages of 128x128 bf16 tiles of A and B: 256 KB of shared memory, past both targets' limits.
    aot.Launch("matmul shared", T.matmul, (1,), (m(128, 1024), m(1024, 128), m(128, 128, dtype=f32), 1024),
               dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4), "bf16", "-"),
    aot.Launch("matmul grid", T.matmul, (1, 70000), (m(64, 1024), m(1024, 64), m(64, 64, dtype=f32), 1024),
               dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2), "bf16", "-"),
]
toys = aot.check_launches(launches, [aot.TARGETS[80], aot.TARGETS[90]], jobs=2)
json.dump({"report": report, "toys": toys, "grouped": aot.grouped(report["rows"]),
           "summary": aot.summary(report["rows"]), "table": aot.table(report["rows"])}, open(out, "w"), default=str)
'''


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("kernel_compile")
    (folder / "toys.py").write_text(TOYS)
    (folder / "driver.py").write_text(DRIVER)
    out = folder / "out.json"
    env = cli_env()
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(folder / "driver.py"), str(folder), str(out)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    data = json.loads(Path(out).read_text())
    if "skip" in data:
        pytest.skip(data["skip"])
    return data


def _rows(compiled: dict, kernel: str, sm: int) -> list[dict]:
    return [r for r in compiled["report"]["rows"] if r["kernel"] == kernel and r["sm"] == sm]


def _describe(r: dict) -> str:
    failed = [k for k, ok in r.get("checks", {}).items() if not ok]
    return (f"{r['kernel']} sm_{r['sm']} {r['variant']} [{r['specialisation']}]: failed {failed} "
            f"{r.get('error', '')} {r.get('offset_violations', '')} registers={r.get('registers')} "
            f"spills={r.get('spill_stores')}/{r.get('spill_loads')} shared={r.get('shared')}")


@pytest.mark.parametrize("sm", TARGETS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_variant_compiles_and_fits(compiled, kernel, sm):
    rows = _rows(compiled, kernel, sm)
    assert rows, f"no variant of {kernel} was enumerated for sm_{sm}"
    failed = [_describe(r) for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    for r in rows:
        assert r["registers"] and r["cubin_registers"] in (None, r["registers"]), _describe(r)  # None: no cuobjdump
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, _describe(r)
        assert 0 <= r["shared"] <= r["shared_limit"], _describe(r)


def test_the_launchers_choices_are_enumerated(compiled):
    """The block sizes and warps the launchers pick at these widths, and the int64 arguments at 1M tokens."""
    choices = {(r["kernel"], r["variant"]) for r in compiled["report"]["rows"]}
    for dtype in ("bf16", "fp16", "fp32"):
        assert ("_rms_norm_fwd_kernel", f"{dtype} LLAMA_CASTS BLOCK_SIZE=4096 8w") in choices  # 8B: hidden 4096
        assert ("_rms_norm_bwd_kernel", f"{dtype} LLAMA_CASTS BLOCK_SIZE=8192 16w") in choices  # 70B: hidden 8192
        for heads in (32, 64):  # 8B, 70B; 8 kv heads, head_dim 128
            for direction in ("!BACKWARD", "BACKWARD"):
                assert ("_rope_kernel", f"{dtype} HALF=64 BLOCK_QH={heads} BLOCK_KH=8 BLOCK_D=64 {direction} 4w") \
                    in choices
        for left in ("MOMENTS_LEFT", "!MOMENTS_LEFT"):
            assert ("_galore_update_kernel", f"{dtype} {left} BLOCK_M=32 BLOCK_N=32 BLOCK_K=16 4w") in choices
    for autocast in ("bf16>fp32 HALF=64 BLOCK_QH=64 BLOCK_KH=8 BLOCK_D=64 !BACKWARD 4w",  # bf16 q, fp32 cos/sin
                     "fp32>bf16 HALF=64 BLOCK_QH=64 BLOCK_KH=8 BLOCK_D=64 BACKWARD 4w"):
        assert ("_rope_kernel", autocast) in choices
    for grad in ("COMPUTE_GRAD", "!COMPUTE_GRAD"):  # vocabulary 128,256: the widest block, 16 warps
        assert ("_ce_chunk_kernel", f"fp32 {grad} BLOCK_SIZE=16384 16w") in choices
    specialisations = {(r["kernel"], r["specialisation"].split(";")[0]) for r in compiled["report"]["rows"]}
    assert ("_swiglu_fwd_kernel", "i64 n_elements") in specialisations  # 1M x 14336 elements
    assert ("_rope_kernel", "i64 q_sb,qo_sb") in specialisations  # a 1M-token q's batch stride


def test_the_64bit_check_applies_at_these_sizes(compiled):
    """Every kernel that walks [tokens x width] rows meets a tensor past 2**31 elements somewhere here, so the
    64-bit check is not vacuous for it; GaLore's weights stay under (28672 x 8192 = 2.3e8 at most)."""
    wide = {}
    for r in compiled["report"]["rows"]:
        wide.setdefault(r["kernel"], set()).update(r["int64_tensors"])
    assert wide["_ce_chunk_kernel"] == {"X"}  # a 32K-token chunk of 128,256 logits
    assert {"X", "Y"} <= wide["_rms_norm_fwd_kernel"]
    assert {"X", "DX", "DY"} <= wide["_rms_norm_bwd_kernel"]
    assert {"q_ptr", "qo_ptr"} <= wide["_rope_kernel"]
    assert {"G", "U", "Y"} <= wide["_swiglu_fwd_kernel"]
    assert {"DY", "G", "U", "DG", "DU"} <= wide["_swiglu_bwd_kernel"]
    assert wide["_galore_update_kernel"] == set()


def _toy(compiled: dict, name: str, sm: int) -> dict:
    (row,) = [r for r in compiled["toys"] if r["kernel"] == name and r["sm"] == sm]
    return row


@pytest.mark.parametrize("sm", TARGETS)
def test_the_checks_can_fail(compiled, sm):
    # 64-bit offsets: i32 row offsets into 2**33 elements are flagged, at the line that computes them ...
    for name in ("rows_i32 big", "flat_i32 big", "loop_i32 big"):
        r = _toy(compiled, name, sm)
        assert r["compiled"] and not r["checks"]["offsets_64bit"], _describe(r)
        assert all("i32 arithmetic" in v and "toys.py:" in v for v in r["offset_violations"]), r["offset_violations"]
    assert {v.split(" + ")[0] for v in _toy(compiled, "rows_i32 big", sm)["offset_violations"]} == {"X", "Y"}
    # ... but not into 2**25 elements, nor with the row in i64.
    for name in ("rows_i32 small", "rows_i64 big"):
        r = _toy(compiled, name, sm)
        assert r["ok"], _describe(r)
    # Spills, shared memory, grid.
    r = _toy(compiled, "norm spills", sm)
    assert not r["checks"]["no_spills"] and r["spill_stores"] > 0, _describe(r)
    r = _toy(compiled, "matmul shared", sm)
    assert not r["checks"]["shared_fits"] and r["shared"] > r["shared_limit"], _describe(r)
    r = _toy(compiled, "matmul grid", sm)
    assert not r["checks"]["grid_fits"] and r["checks"]["shared_fits"], _describe(r)


def test_the_tables(compiled):
    grouped = compiled["grouped"].splitlines()
    assert grouped[0] == "| kernel | variant | sm | registers | shared memory | spills | compiled | checks |"
    assert all(line.endswith("| ok |") for line in grouped[2:]), compiled["grouped"]
    summary = compiled["summary"].splitlines()
    assert len(summary) == 2 + len(KERNELS) * len(TARGETS)
    assert len(compiled["table"].splitlines()) == 2 + len(compiled["report"]["rows"])
