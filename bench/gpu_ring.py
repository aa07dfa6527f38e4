"""The NVMe ring of the activation stash under real CUDA streams: no ring slot is reused while a copy out of it waits.

    python bench/gpu_ring.py                     # a GPU: 8 layers, prefetch depth 1 and 2, 5 rounds each
    python bench/gpu_ring.py --small --allow-cpu # the CPU: the lagging-device mover stands in for the streams

tests/test_activation_runtime.py::test_the_nvme_ring_waits_for_the_device_before_reusing_a_slot checks this on
the CPU, where a lagging mover runs copies as late as a stream may. Here the same sequence runs on a GPU with
the runtime's own CUDA movers: every layer's input goes to NVMe through the ring of `prefetch_depth + 2` pinned
host buffers; in backward, each layer's "compute" is a kernel that keeps the compute stream busy
(torch.cuda._sleep) followed by a copy of its prefetched input, so the host runs layers ahead of the device,
as it does in training, and the NVMe read of a later layer lands in a slot whose host-to-device copy is still
queued behind compute unless the stash waits for it. The forward sleeps too, so the device-to-host copies into
the ring lag the host's NVMe writes. Every layer must read back its own bytes. Prints one JSON line per
(depth, round) and a summary; --json writes the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

G = 4  # token chunks per class


def check(device_type: str, layers: int, hidden: int, seq: int, depth: int, rounds: int, sleep_cycles: int,
          nvme_dir: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from longtune.offload.runtime import MemoryRuntime, RuntimeOptions
    from longtune.offload.stash import SavedRef
    from longtune.planner.plan import plan_of
    from longtune.planner.problem import CLASSES, Machine, ModelShape, Tier, build_problem

    cuda = device_type == "cuda"
    device = torch.device(device_type)
    cfg = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": seq,
           "tie_word_embeddings": False}
    c = dict(cfg)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c), attn_implementation="sdpa",
                                             dtype=torch.float32).to(device).train()
    machine = Machine("ring", 1e12, 1e12, 0.5, 0.5, (Tier("host", 1e12, 1e10, 1e10), Tier("nvme", 1e12, 5e9, 5e9)))
    problem = build_problem(ModelShape.from_hf_config(cfg, "float32"), seq, machine, 1e12, chunks=G, prefetch_depth=depth)
    layout = [{cls: ({"nvme": G} if cls == "input" else {"gpu": G}) for cls in CLASSES} for _ in range(layers)]
    plan = plan_of(problem, layout)
    runtime = MemoryRuntime(model, plan, RuntimeOptions(device, activations=True, prefetch_depth=depth,
                                                        nvme_path=nvme_dir, lagging_copies=not cuda))
    wrong, start = [], time.perf_counter()
    try:
        stash = runtime.dispatcher.stash
        ring_slots = len(stash._ring)
        for r in range(rounds):
            gen = torch.Generator(device=device).manual_seed(100 + r)
            saved = [torch.randn(1, seq, hidden, generator=gen, device=device) for _ in range(layers)]
            refs = []
            for l in range(layers):  # forward: each layer "computes", then stashes its input to NVMe
                stash.begin_forward(l)
                if cuda:
                    torch.cuda._sleep(sleep_cycles)
                refs.append(SavedRef(stash.put(l, "nvme", saved[l]), saved[l]))
                stash.end_forward(l)
            stash.prefetch(layers - 1)  # at the end of the forward, as the runtime does
            read = [torch.empty_like(t) for t in saved]
            for l in reversed(range(layers)):  # backward in the runtime's order (offload/activations.py)
                stash.prefetch(l)
                stash.prefetch(l - depth)
                if cuda:
                    stash.ready(l)  # the compute stream waits for the prefetch; the host does not
                    torch.cuda._sleep(sleep_cycles)  # the layer's compute keeps the device behind the host
                    read[l].copy_(refs[l].tensor())
                else:  # the lagging mover's queue is the device: compute's read is a copy queued on it
                    runtime.h2d.copy(read[l], refs[l].tensor())
                stash.release(l)
            stash.finish()
            if cuda:
                torch.cuda.synchronize()
            else:
                runtime.h2d._run_until(None)
            bad = [l for l in range(layers) if not torch.equal(read[l], saved[l])]
            if bad:
                wrong.append({"round": r, "layers_with_other_bytes": bad})
    finally:
        runtime.close()
    return {"device": torch.cuda.get_device_name() if cuda else "cpu (lagging mover)", "depth": depth,
            "ring_slots": ring_slots, "layers": layers, "rounds": rounds, "bytes_per_layer": seq * hidden * 4,
            "sleep_cycles": sleep_cycles if cuda else 0, "ok": not wrong, "wrong": wrong,
            "nvme_read_bytes": stash.nvme_read, "nvme_written_bytes": stash.nvme_written,
            "wall_s": time.perf_counter() - start}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--depths", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sleep-cycles", type=int, default=4_000_000, help="GPU cycles each layer's compute lasts (~2 ms)")
    ap.add_argument("--small", action="store_true", help="tiny sizes, 2 rounds")
    ap.add_argument("--allow-cpu", action="store_true", help="without a GPU, the lagging CPU mover (plumbing)")
    ap.add_argument("--nvme-dir", default=None, help="scratch folder for the NVMe tier (default: a temp folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("bench/gpu_ring.py needs a CUDA GPU (or --allow-cpu, for plumbing)", file=sys.stderr)
        return 2
    if args.small:
        args.layers, args.hidden, args.seq, args.rounds = 6, 32, 48, 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="longtune-ring-", dir=args.nvme_dir) as scratch:
        for depth in map(int, args.depths.split(",")):
            row = check("cuda" if cuda else "cpu", args.layers, args.hidden, args.seq, depth, args.rounds,
                        args.sleep_cycles, f"{scratch}/d{depth}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {"bench": "gpu_ring", "ok": all(r["ok"] for r in rows), "rows": rows}
    print(f"nvme ring under {'CUDA streams' if cuda else 'the lagging CPU mover'}: "
          f"{'every layer read back its own bytes' if summary['ok'] else 'WRONG BYTES'} "
          f"({sum(r['rounds'] for r in rows)} rounds, depths {args.depths})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
