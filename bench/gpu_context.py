"""On one GPU: the longest context that trains, longtune's plan against transformers + gradient checkpointing.

    python bench/gpu_context.py                                  # Llama-3.2-1B shape, 32K..512K, both modes
    python bench/gpu_context.py --arch 3b --seqs 65536,131072 --modes longtune

Each (mode, length) runs in its own process: two optimizer steps of a random-init bf16 model with AdamW on the
GPU, then reports or dies of OOM.

  hf         transformers (sdpa) + gradient checkpointing of every decoder layer, the fused loss
  longtune   the activation runtime with the plan solved for memory.budget_gb=auto (the free memory less 5%),
             host tier for activations (and state, if the solver puts it there), the fused loss

Per run: step time (the second step), torch.cuda.max_memory_allocated beside the plan's predicted peak (the
claim checked: within 5%), the saved-activation peak the runtime measured beside the plan's, the seconds
compute stalled on copies (its share of the step), the recompute time. Writes
bench/results/gpu_context-<date>.json. Needs a CUDA GPU; prints the reason and exits 2 without one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
ARCHS = {  # Llama-3.2 shapes
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}


def config(arch: str, seq: int, mode: str) -> dict:
    return {
        "model": {"config": {"model_type": "llama", "vocab_size": 128256, "max_position_embeddings": max(seq, 131072),
                             "rope_theta": 500000.0, **ARCHS[arch]},
                  "dtype": "bfloat16", "kernels": {"fused_ce": True, "rmsnorm": True, "rope": True, "swiglu": True}},
        "data": {"kind": "passkey", "seq_len": seq, "passkey": {"eval_samples": 0}},
        "train": {"max_steps": 2, "lr": 1e-5, "warmup_steps": 0},
        "memory": {"budget_gb": "auto", "machine": "h100-pcie5"} if mode == "longtune" else {"gradient_checkpointing": True},
        "checkpoint": {"every_n_steps": 0, "save_final": False},
        "log": {"sinks": ["jsonl"]},
    }


def child(arch: str, seq: int, mode: str, out_dir: str) -> dict:
    import torch

    from longtune.trainer.config import validate
    from longtune.trainer.train import train

    cfg = config(arch, seq, mode)
    cfg["run"] = {"output_dir": out_dir}
    row = {"arch": arch, "seq": seq, "mode": mode}
    try:
        train(validate(cfg))
    except torch.cuda.OutOfMemoryError as e:
        return {**row, "ok": False, "error": f"OOM: {str(e).splitlines()[0]}"}
    except Exception as e:  # noqa: BLE001 -- a bench row, not a crash: say what failed
        return {**row, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    metrics = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    last = metrics[-1]
    row.update(ok=True, step_s=last["step_time_s"], tokens_per_s=last["tokens_per_s"],
               max_allocated_gb=torch.cuda.max_memory_allocated() / GB,
               **{k: v for k, v in last.items() if k.startswith("mem_") or k in ("offload_wait_s", "recompute_s")})
    if "offload_wait_s" in last:
        row["exposed_copy_share"] = last["offload_wait_s"] / last["step_time_s"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="1b")
    ap.add_argument("--seqs", default="32768,65536,131072,262144,524288")
    ap.add_argument("--modes", default="hf,longtune")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        mode, seq, out_dir = args.child
        print("RESULT " + json.dumps(child(args.arch, int(seq), mode, out_dir)), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_context.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from longtune.bench.provenance import git_commit

    rows, longest = [], {}
    for mode in args.modes.split(","):
        for seq in map(int, args.seqs.split(",")):
            start = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--child", mode, str(seq),
                                       f"/tmp/longtune-gpu-context/{mode}-{seq}"], capture_output=True, text=True,
                                      timeout=args.timeout)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                row = json.loads(line[7:]) if line else {"arch": args.arch, "seq": seq, "mode": mode, "ok": False,
                                                        "error": (proc.stderr.strip().splitlines() or ["died"])[-1]}
            except subprocess.TimeoutExpired:
                row = {"arch": args.arch, "seq": seq, "mode": mode, "ok": False, "error": f"over {args.timeout:.0f} s"}
            row["wall_s"] = time.perf_counter() - start
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not row["ok"]:
                break  # longer ones will not fit either
            longest[mode] = seq
    print(f"longest context that trains on one {torch.cuda.get_device_name()}: "
          + ", ".join(f"{m} {longest.get(m, 0):,}" for m in args.modes.split(",")))
    out = Path(args.out or REPO / "bench" / "results" / f"gpu_context-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": "gpu_context", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
                               "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "longest": longest,
                               "rows": rows}, indent=1))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
