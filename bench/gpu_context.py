"""On one GPU: the longest context that trains, longtune's plan against transformers + gradient checkpointing.

    python bench/gpu_context.py                                  # Llama-3.2-1B shape, 32K..512K, both modes
    python bench/gpu_context.py --arch 3b --seqs 65536,131072 --modes longtune
    python bench/gpu_context.py --seqs 32768 --modes longtune --budget-gb 20   # a plan that offloads and recomputes
    python bench/gpu_context.py --seqs 65536,131072,262144 --deadline-s 200    # stop starting lengths after 200 s

Each (mode, length) runs in its own process: two optimizer steps of a random-init bf16 model with AdamW on the
GPU, then reports or dies of OOM.

  hf         transformers (sdpa) + gradient checkpointing of every decoder layer, the fused loss
  longtune   the activation runtime with the plan solved for memory.budget_gb=auto (the free memory less 5%),
             host tier for activations (and state, if the solver puts it there), the fused loss

Per run: step time (the last step), torch.cuda.max_memory_allocated beside the plan's predicted peak (the
claim checked: within 5%; `plan_vs_measured` is their ratio, `within_5pct` the verdict), the saved-activation
peak the runtime measured beside the plan's, the seconds compute stalled on copies (its share of the step), the
recompute time. Writes bench/results/gpu_context-<date>.json (or --out). Needs a CUDA GPU; prints the reason and
exits 2 without one, unless --allow-cpu (plumbing only: the "device" is then the CPU, no allocator peak).
`--arch tiny` is a 2-layer model for such plumbing runs (bench/gpu_check.py --small).
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
    # Plumbing only (bench/gpu_check.py --small on a CPU): seconds a step; the vocabulary holds the tokenizer's.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, vocab_size=49152),
}
WITHIN = 0.05  # the claim: the plan's peak is torch.cuda.max_memory_allocated to within 5%


def config(arch: str, seq: int, mode: str, budget_gb="auto", machine: str = "h100-pcie5", steps: int = 2,
           host_gb=None) -> dict:
    shape = dict(ARCHS[arch])
    vocab = shape.pop("vocab_size", 128256)
    memory = {"budget_gb": budget_gb, "machine": machine}
    if host_gb is not None:
        memory["tiers"] = {"host_gb": host_gb}
    return {
        "model": {"config": {"model_type": "llama", "vocab_size": vocab, "max_position_embeddings": max(seq, 131072),
                             "rope_theta": 500000.0, **shape},
                  "dtype": "bfloat16", "kernels": {"fused_ce": True, "rmsnorm": True, "rope": True, "swiglu": True}},
        "data": {"kind": "passkey", "seq_len": seq, "passkey": {"eval_samples": 0}},
        "train": {"max_steps": steps, "lr": 1e-5, "warmup_steps": 0},
        "memory": memory if mode == "longtune" else {"gradient_checkpointing": True},
        "checkpoint": {"every_n_steps": 0, "save_final": False},
        "log": {"sinks": ["jsonl"]},
    }


def budget_arg(text: str):
    return text if text == "auto" else float(text)


def child(arch: str, seq: int, mode: str, out_dir: str, budget_gb="auto", machine: str = "h100-pcie5",
          steps: int = 2, host_gb=None) -> dict:
    import torch

    from longtune.trainer.config import validate
    from longtune.trainer.train import train

    cfg = config(arch, seq, mode, budget_gb, machine, steps, host_gb)
    cfg["run"] = {"output_dir": out_dir}
    row = {"arch": arch, "seq": seq, "mode": mode, "steps": steps}
    if mode == "longtune":
        row.update(budget_gb=budget_gb, machine=machine, host_gb=host_gb)
    cuda = torch.cuda.is_available()
    try:
        train(validate(cfg))
    except torch.cuda.OutOfMemoryError as e:
        return {**row, "ok": False, "error": f"OOM: {str(e).splitlines()[0]}"}
    except Exception as e:  # noqa: BLE001 -- a bench row, not a crash: say what failed
        import traceback

        return {**row, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                "traceback": traceback.format_exc().splitlines()[-25:]}
    metrics = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    last = metrics[-1]
    row.update(ok=True, device=torch.cuda.get_device_name() if cuda else "cpu", step_s=last["step_time_s"],
               tokens_per_s=last["tokens_per_s"], loss=last["loss"],
               **{k: v for k, v in last.items() if k.startswith("mem_") or k in ("offload_wait_s", "recompute_s")})
    if cuda:
        row["max_allocated_gb"] = torch.cuda.max_memory_allocated() / GB
        if row.get("mem_plan_gpu_total_gb"):
            row["plan_vs_measured"] = row["max_allocated_gb"] / row["mem_plan_gpu_total_gb"]
            row["within_5pct"] = abs(row["plan_vs_measured"] - 1) <= WITHIN
    if "offload_wait_s" in last:
        row["exposed_copy_share"] = last["offload_wait_s"] / last["step_time_s"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="1b")
    ap.add_argument("--seqs", default="32768,65536,131072,262144,524288")
    ap.add_argument("--modes", default="hf,longtune")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one (mode, length) run may take")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="no run starts after this many seconds, or when the last length's time predicts it would "
                         "not end by then, and none runs past it (reported as not run)")
    ap.add_argument("--budget-gb", type=budget_arg, default="auto",
                    help="longtune's memory.budget_gb: auto (the free memory less 5%%) or GB, e.g. 20 to force offload")
    ap.add_argument("--machine", default="h100-pcie5", help="memory.machine: the profile the planner times with")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps a run takes (the last one is timed)")
    ap.add_argument("--host-gb", type=float, default=None, help="memory.tiers.host_gb (default: the free host RAM)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU (plumbing only)")
    ap.add_argument("--work-dir", default="/tmp/longtune-gpu-context", help="where the runs' folders go")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        mode, seq, out_dir = args.child
        print("RESULT " + json.dumps(child(args.arch, int(seq), mode, out_dir, args.budget_gb, args.machine,
                                           args.steps, args.host_gb)), flush=True)
        return 0
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("bench/gpu_context.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from longtune.bench.provenance import git_commit

    device = torch.cuda.get_device_name() if cuda else "cpu"
    began = time.perf_counter()
    rows, longest, first_failing = [], {}, {}
    for mode in args.modes.split(","):
        for seq in map(int, args.seqs.split(",")):
            row = {"arch": args.arch, "seq": seq, "mode": mode}
            left = None if args.deadline_s is None else args.deadline_s - (time.perf_counter() - began)
            if left is not None and left < 5:
                rows.append({**row, "ok": None, "error": f"not run: past the {args.deadline_s:.0f} s deadline"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            guess = predicted_wall_s(rows, mode, seq, args.steps)
            if left is not None and guess is not None and guess > left:
                rows.append({**row, "ok": None, "error": f"not run: ~{guess:.0f} s predicted from the last length "
                                                         f"(its steps x the length ratio squared), {left:.0f} s left"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            limit = args.timeout if left is None else min(args.timeout, left)
            start = time.perf_counter()
            row = run_child(args, mode, seq, limit, row)
            row["wall_s"] = time.perf_counter() - start
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not row["ok"]:
                first_failing[mode] = seq
                break  # longer ones will not fit either (or not in the time left)
            longest[mode] = seq
    print(f"longest context that trains on one {device}: "
          + ", ".join(f"{m} {longest.get(m, 0):,}" for m in args.modes.split(",")))
    out = Path(args.out or REPO / "bench" / "results" / f"gpu_context-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": "gpu_context", "device": device, "torch": torch.__version__,
                               "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
                               "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "longest": longest,
                               "first_failing": first_failing, "rows": rows}, indent=1))
    print(f"results in {out}")
    return 0


def predicted_wall_s(rows: list[dict], mode: str, seq: int, steps: int):
    """A run's wall time guessed from the last one of this mode that trained: its start-up (wall less its steps)
    plus its steps scaled by the length ratio squared (attention dominates long sequences); None if none."""
    last = next((r for r in reversed(rows) if r["mode"] == mode and r.get("ok")), None)
    if last is None or "wall_s" not in last:
        return None
    overhead = max(0.0, last["wall_s"] - steps * last["step_s"])
    return overhead + steps * last["step_s"] * (seq / last["seq"]) ** 2


def run_child(args, mode: str, seq: int, limit: float, row: dict) -> dict:
    """One (mode, length) run in its own process (its own allocator peak; an OOM or a hang is a row)."""
    import os
    import signal

    cmd = [sys.executable, __file__, "--arch", args.arch, "--budget-gb", str(args.budget_gb), "--machine",
           args.machine, "--steps", str(args.steps), *(["--host-gb", str(args.host_gb)] if args.host_gb else []),
           "--child", mode, str(seq), f"{args.work_dir}/{mode}-{seq}"]
    env = {**os.environ, "PYTHONSAFEPATH": "1"}  # the checkout's folders never import under bare names
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and anything it started
        stdout, stderr = proc.communicate()
        return {**row, "ok": False, "error": f"over {limit:.0f} s (time, not memory)", "timed_out": True,
                "output_tail": (stdout + stderr).strip().splitlines()[-15:]}
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    if line:
        return json.loads(line[7:])
    return {**row, "ok": False, "error": (stderr.strip().splitlines() or [f"died (exit {proc.returncode})"])[-1],
            "output_tail": (stdout + stderr).strip().splitlines()[-25:]}


if __name__ == "__main__":
    sys.exit(main())
