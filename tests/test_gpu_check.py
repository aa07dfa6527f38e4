"""bench/gpu_check.py, the one command for a lent GPU, end to end on the CPU with every size shrunk (--small):
each part's child runs, its result lands in the JSON, and the GPU claims say "skipped: no CUDA"."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, cli_env

PARTS = ["environment", "pytest_gpu", "plan_vs_measured", "nvme_ring", "kernel_speed", "longest_context"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU plumbing run; on a GPU the check runs for real")
def test_small_run_writes_every_part_into_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = cli_env()
    env.pop("OUT", None)  # not the GPU tool's: nothing to copy
    env.pop("TRITON_INTERPRET", None)  # the check sets it for the kernels' child alone
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--small", "--probe-seqs", "256", "--out", str(out),
                           "--work-dir", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["bench"] == "gpu_check" and doc["small"] is True and doc["cuda"] is False
    assert list(doc["parts"]) == PARTS and doc["summary"] == {p: doc["parts"][p]["status"] for p in PARTS}
    assert "summary: environment passed" in proc.stdout

    env_part = doc["parts"]["environment"]
    assert env_part["status"] == "passed", env_part
    assert env_part["result"]["tokenizer"]["vocab"] == 49152 and "HiGHS" in env_part["result"]["pulp_solvers"]

    tests = doc["parts"]["pytest_gpu"]
    assert tests["status"] == "skipped" and tests["reason"].startswith("no CUDA")
    assert tests["result"]["counts"]["skipped"] >= 20 and tests["result"]["counts"]["failed"] == 0
    assert "tests/test_gpu.py" in tests["result"]["files"] and "tests/test_gpu_runtime.py" in tests["result"]["files"]

    for name in PARTS[2:]:  # the GPU claims: skipped here, each after its child ran and reported
        part = doc["parts"][name]
        assert part["status"] == "skipped" and part["reason"].startswith("no CUDA"), (name, part)
        assert part["plumbing_ok"] is True and part["rc"] == 0 and part["wall_s"] > 0, (name, part)

    row = doc["parts"]["plan_vs_measured"]["result"]["rows"][0]
    assert row["ok"] and row["seq"] == 512 and row["mem_plan_gpu_gb"] > 0 and row["mem_measured_gpu_gb"] > 0

    ring = doc["parts"]["nvme_ring"]["result"]
    assert ring["ok"] and [r["depth"] for r in ring["rows"]] == [1, 2]
    assert all(r["nvme_read_bytes"] >= r["nvme_written_bytes"] > 0 for r in ring["rows"])

    kernels = doc["parts"]["kernel_speed"]["result"]
    assert kernels["interpreter"] and [r["kernel"] for r in kernels["rows"]] == \
        ["rmsnorm", "swiglu", "rope", "fused_linear_ce", "galore_update", "galore_update"]
    assert all(r["ok"] and r["torch" if "torch" in r else "torch_chunked"]["max_rel_err"] < 1e-3
               for r in kernels["rows"])

    probe = doc["parts"]["longest_context"]["result"]
    assert probe["longest"] == {"longtune": 256} and probe["predicted"]["seq_len"] > 256
