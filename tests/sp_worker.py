"""One rank of the sequence-parallel exactness check (tests/test_sequence_parallel.py runs it under torchrun).

For every case (model family, packed documents or not, plain autograd or the activation runtime with a plan
that offloads and recomputes) each rank builds the same tiny model twice: one runs the whole batch unsharded
(the reference, plain transformers with SDPA), the other runs under sequence parallelism on this rank's
shard (trainer/sequence_parallel.py). The loss of a rank is its targets' sum over the global target count and
the gradients are summed over all ranks, as the trainer does. Rank 0 writes, per case, the loss difference and
the largest gradient difference relative to that gradient's norm.

    python -m torch.distributed.run --nproc-per-node N tests/sp_worker.py OUT.json CASE [CASE ...]

CASE is family[+lora]:packed|plain:hf|runtime:SP (+lora: LoRA adapters on every projection, only they train).
With N > SP, the ranks of different sequence groups take different
sequences of the batch (data parallel x sequence parallel).
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))  # the runtime tests' module beside this one (PYTHONSAFEPATH adds no folder)

from longtune.offload.runtime import MemoryRuntime, RuntimeOptions
from longtune.offload.ulysses import SequenceGroup
from longtune.planner.plan import plan_of
from longtune.planner.problem import CLASSES, Machine, ModelShape, Tier, build_problem
from longtune.trainer.data import IGNORE_INDEX, Batch
from longtune.trainer.sequence_parallel import SequenceParallel
from test_activation_runtime import build, tiny  # noqa: E402  (the runtime tests' tiny families)

SEQ, ROWS, CHUNKS = 64, 2, 2  # tokens per sequence, sequences per data-parallel rank, plan chunks per shard


def batch(packed: bool, rows: int) -> Batch:
    """`rows` sequences; packed: documents of 20, 30 and 14 tokens (one crosses every shard boundary), labels
    ignored at each document's first token, as the packer writes them."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (rows, SEQ), generator=g)
    lengths = (20, 30, 14) if packed else (SEQ,)
    pos = torch.cat([torch.arange(n) for n in lengths]).expand(rows, SEQ).contiguous()
    labels = ids.clone()
    labels[pos == 0] = IGNORE_INDEX
    return Batch(ids, labels, pos)


def tight_plan(cfg: dict, tokens: int):
    """Layer 0 offloads half of each class to the host and recomputes the other half; layer 1 keeps its input
    and attention output, offloads pre and recomputes post."""
    shape = ModelShape.from_hf_config(cfg, "float32")
    host = Tier("host", 1e12, 1e10, 1e10)
    problem = build_problem(shape, tokens, Machine("test", 1e12, 1e12, 0.5, 0.5, (host,)), 1e12, chunks=CHUNKS)
    half = {"host": CHUNKS // 2, "recompute": CHUNKS - CHUNKS // 2}
    layer0 = {c: ({"host": CHUNKS} if c == "attn" else dict(half)) for c in CLASSES}
    layer0["input"] = {"host": CHUNKS}
    layer1 = {"input": {"gpu": CHUNKS}, "attn": {"gpu": CHUNKS}, "pre": {"host": CHUNKS}, "post": {"recompute": CHUNKS}}
    return plan_of(problem, [layer0, layer1])


def build_model(cfg: dict, lora: bool):
    """The tiny model; with LoRA adapters (their B not zero, so every adapter weight gets a gradient)."""
    model = build(cfg)
    if lora:
        from longtune.trainer.adapters import apply_adapter
        from longtune.trainer.config import AdapterConfig

        apply_adapter(model, AdapterConfig(kind="lora", rank=4, alpha=8.0))
        torch.manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    return model


def run_case(case: str, groups: dict, world: int, rank: int) -> dict:
    family, packing, path, size = case.split(":")
    family, lora = family.removesuffix("+lora"), family.endswith("+lora")
    sp = groups[int(size)]
    cfg = tiny(family)
    whole = batch(packing == "packed", ROWS * sp.dp_world)

    reference = build_model(cfg, lora)
    out = reference(input_ids=whole.input_ids, position_ids=whole.position_ids, labels=whole.labels)
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}

    model = build_model(cfg, lora)
    sp.apply(model)
    rows = slice(sp.dp_rank * ROWS, (sp.dp_rank + 1) * ROWS)
    mine = sp.shard(Batch(whole.input_ids[rows], whole.labels[rows], whole.position_ids[rows]))
    n_targets = torch.tensor(mine.loss_tokens)
    dist.all_reduce(n_targets)
    runtime = None
    if path == "runtime":
        plan = tight_plan(cfg, ROWS * SEQ // sp.size)
        runtime = MemoryRuntime(model, plan, RuntimeOptions(torch.device("cpu"), activations=True,
                                                            sequence=sp.group))
    try:
        with runtime.step(1) if runtime else torch.enable_grad():
            loss = model(input_ids=mine.input_ids, position_ids=mine.position_ids, labels=mine.labels,
                         shift_labels=mine.shift_labels, num_items_in_batch=int(n_targets)).loss
            loss.backward()
        if runtime:  # the plan ran: bytes came back from the host, chunks were recomputed
            moved, recomputed = runtime.activations.stash.bytes_to_device, sum(runtime.activations.take_recompute_s().values())
        else:
            moved = recomputed = None
    finally:
        if runtime:
            runtime.close()
    loss = loss.detach()
    dist.all_reduce(loss)
    worst, worst_name = 0.0, None
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad.clone()
        dist.all_reduce(g)
        rel = float((g - ref_grads[n]).abs().max() / ref_grads[n].norm().clamp_min(1e-12))
        if rel > worst:
            worst, worst_name = rel, n
    return {"loss": float(loss), "reference_loss": float(out.loss), "loss_diff": abs(float(loss - out.loss)),
            "grad_rel": worst, "worst": worst_name, "params": len(ref_grads), "moved_bytes": moved,
            "recompute_s": recomputed}


def main() -> None:
    out_path, cases = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = {}
    for size in sorted({int(c.rsplit(":", 1)[1]) for c in cases}):  # every rank makes every group, in order
        pgs = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(world // size)]
        groups[size] = SequenceParallel(size, rank % size, rank // size, world // size,
                                        SequenceGroup(size, rank % size, pgs[rank // size]))
    results = {case: run_case(case, groups, world, rank) for case in cases}
    if rank == 0:
        out_path.write_text(json.dumps(results, indent=1))
    dist.barrier()  # no rank tears the group down while another is still in a collective (gloo aborts: SIGABRT)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
