"""One full-size training step on tensors that hold no data: `longtune plan CFG --dry-run`.

The configured model is built on the meta device, which stands for the GPU (no bytes behind a tensor), and the
real memory runtime carries out the plan on it: the layers' token chunks, the attention ops the GPU takes
(FlashAttention's forward and backward, whose meta kernels give their outputs), the stash's arena views and
tiers, the NVMe ring, the optimizer and the weight tiers. Whatever the host allocates is a fake CPU tensor
(torch's FakeTensorMode): the same shapes, no data. `LiveBytes` counts every storage from the op that makes it
to the last tensor that refers to it, per device, and keeps the step's timeline. A laptop checks a
million-token config this way before anybody rents a GPU.

What stands in for what, and what a dry run therefore cannot see:
- CUDA streams: the lagging movers (movers.py). Copies run in stream order, when compute, the host or a later
  copy needs them, on the host thread: the order and lifetimes of a stream, not its timing.
- Worker threads (the optimizer's per-layer step, the weight fetcher, NVMe and ring I/O) run their jobs when
  they are submitted (FakeTensorMode is not thread-safe): host work never overlaps compute here.
- NVMe: the store's files are not written (fake tensors hold no bytes); what goes there is counted.
- Triton kernels do not launch on meta: the torch references run (kernels/backend.py), with their own
  temporaries. Autocast has no meta device: the step runs in the weights' dtype.
- Data: positions and labels hold nothing, so every sequence is one document and every label counts.
- Sequence parallelism: one rank of the group runs; torch's fake process group stands for the others (its
  all-to-alls move nothing, which fake tensors do not need). Data parallel ranks are not run.
- FlashAttention's backward allocates inside the kernel: the dry run allocates as much around the call, from
  the planner's description of it (offload/attention.py). The caching allocator's rounding and fragmentation,
  and cuBLAS's workspaces, are not there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from longtune.planner.timeline import positions

from .adapters import apply_adapter
from .config import Config
from .errors import ConfigError
from .memory import build_runtime
from .model import build_model, patch_model

GB = 1e9
GPU, HOST = "meta", "cpu"  # the devices that stand for them


@dataclass
class DryRun:
    peak_bytes: dict[str, int]  # "gpu" and "host": the largest bytes alive at once during the step
    ops: int  # torch ops the step ran (forward, backward, optimizer)
    forward_ops: int  # of which the forward's
    seconds: float
    samples: list[tuple[int, dict[str, int]]] = field(default_factory=list)  # (op, bytes per device) on change
    activation_peak_bytes: int = 0  # the runtime's own count of saved activations on the device (residency)
    # The op at which each decoder layer's backward began (its output's gradient arrived), by layer, and (-1) the
    # head's forward: where the plan's rows (timeline.positions) start on the op axis.
    backward_starts: dict[int, int] = field(default_factory=dict)


def dry_run(cfg: Config, plan, timeline: bool = False) -> DryRun:
    """Run one step of `cfg` as `plan` says, on meta and fake tensors; returns what it allocated where."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from longtune.offload.live_bytes import LiveBytes

    cfg = cfg.model_copy(deep=True)
    cfg.memory.cpu_adam = "torch"  # DeepSpeed's C++ Adam walks raw memory; a fake tensor has none
    start = time.perf_counter()
    with torch.device(GPU):
        model = build_model(cfg.model, uninitialised=True)
        apply_adapter(model, cfg.adapter)
    counter = LiveBytes(record=timeline)
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        _make_fake(model, fake)  # before the counter: it adopts them as made, not as there before it
        counter.adopt([*model.parameters(), *model.buffers()])
    with fake, counter:
        patch_model(model, cfg)
        P = cfg.parallel.sequence_parallel
        sp = _one_rank_of(cfg, P) if P > 1 else None
        if sp is not None:
            sp.apply(model)
        runtime = build_runtime(cfg, model, plan, torch.device(GPU), world=P, sequence=sp.group if sp else None)
        if plan.optimizer_tier == "gpu":
            _make_optimizer_state(runtime.optimizer)
        backward_starts: dict[int, int] = {}
        marks = _mark_backward_starts(model, counter, backward_starts)
        # The step starts here. The model was made on the device, where a run makes it on the host and the
        # runtime places it: the weights the runtime streamed from the host are gone from the device now.
        counter.reset_peak()
        try:
            ids = torch.zeros(cfg.train.micro_batch_size, cfg.data.seq_len // P, dtype=torch.long, device=GPU)
            labels = {"shift_labels": ids} if P > 1 else {}  # a shard's targets come shifted over the whole sequence
            with runtime.step(1):
                out = model(input_ids=ids, position_ids=torch.zeros_like(ids), labels=ids,
                            num_items_in_batch=ids.numel() * P, use_cache=False, **labels)
                forward_ops = counter.ops
                out.loss.backward()
                del out
            runtime.clip_and_step()
            runtime.zero_grad()
            residency = runtime.dispatcher.residency.device_peak if runtime.activations is not None else 0
        finally:
            for mark in marks:
                mark.remove()
            runtime.close()
            if sp is not None:
                torch.distributed.destroy_process_group()
    return DryRun(peak_bytes={"gpu": counter.device_peak[GPU], "host": counter.device_peak[HOST]}, ops=counter.ops,
                  forward_ops=forward_ops, seconds=time.perf_counter() - start, samples=counter.samples or [],
                  activation_peak_bytes=residency, backward_starts=backward_starts)


def _make_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """A run holds its optimizer's state from the end of its first step on, and the plan counts it in every row;
    torch's AdamW on the device (GaLore's too) makes it lazily, in that first step. So, before the counted step,
    one step of it on zero gradients (fake: it changes nothing that matters) makes the state a run's every later
    step holds. (The optimizers off the device, offload/optimizer.py, make theirs when they are built.)"""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _mark_backward_starts(model: torch.nn.Module, counter, starts: dict[int, int]) -> list:
    """Forward hooks that note, in `starts`, the op count when each decoder layer's output gradient arrives."""
    from longtune.models.layers import decoder_layers

    layers = decoder_layers(model)

    def note(index: int) -> None:
        starts.setdefault(index, counter.ops)  # the first time: a recomputed forward is not a new position

    def hook(module, args, output, index):
        out = output if isinstance(output, torch.Tensor) else output[0]
        if torch.is_grad_enabled() and out.requires_grad:
            out.register_hook(lambda grad: note(index))
            if index == len(layers) - 1:
                note(-1)  # the head (final norm, loss) runs from here

    return [layer.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i)) for i, layer in enumerate(layers)]


def _one_rank_of(cfg: Config, world: int):
    """Rank 0 of a sequence group of `world` with nobody else there: torch's fake process group stands for the
    others (its collectives return at once and leave their outputs as they are: a dry run's hold no data)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from .ranks import Ranks
    from .sequence_parallel import SequenceParallel

    if dist.is_initialized():
        raise ConfigError("a dry run of sequence parallelism runs in a process of its own, outside any process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    return SequenceParallel.build(cfg, Ranks(0, world))


def _make_fake(model: torch.nn.Module, fake) -> None:
    """The meta model's parameters and buffers as fake tensors of the same device (tied weights stay tied)."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, as_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in table.items():
                if t is None:
                    continue
                if id(t) not in made:
                    f = fake.from_tensor(t)
                    made[id(t)] = torch.nn.Parameter(f, requires_grad=t.requires_grad) if as_param else f
                table[name] = made[id(t)]


def compare(plan, run: DryRun) -> list[tuple[str, float, float]]:
    """(what, the plan's bytes, the dry run's bytes) for the GPU peak, the host peak and saved activations."""
    pred = plan.predicted
    return [("GPU peak", pred["peak_bytes"]["gpu"], run.peak_bytes["gpu"]),
            ("host peak", pred["peak_bytes"].get("host", 0.0), run.peak_bytes["host"]),
            ("saved activations on the GPU", pred.get("activation_peak_bytes", 0.0), run.activation_peak_bytes)]


def format_dry_run(plan, run: DryRun) -> str:
    lines = [f"dry run: one step, {run.ops:,} ops ({run.forward_ops:,} in the forward), {run.seconds:.1f} s on this "
             "machine, on meta and fake tensors",
             f"  {'':<30}{'plan':>10}{'dry run':>10}{'':>9}"]
    for what, planned, measured in compare(plan, run):
        ratio = f"{(measured / planned - 1) * 100:+.1f}%" if planned else ""
        lines.append(f"  {what:<30}{planned / GB:>8.2f}GB{measured / GB:>8.2f}GB{ratio:>9}")
    budget = plan.problem.budget_bytes
    lines.append(f"  GPU budget {budget / GB:.2f} GB: the dry run's peak is "
                 f"{'inside' if run.peak_bytes['gpu'] <= budget else 'OVER'} it")
    return "\n".join(lines)


def _plan_rows_over_ops(plan, run: DryRun) -> Optional[tuple[list[int], list[float]]]:
    """The plan's GPU rows (the head, then each layer's backward) as a step function over the dry run's ops: the
    head's from the end of the last layer's forward, each layer's from the op its backward began at, to the
    step's end. (The forward's rows are bounded by the backward's: the plan has none of its own.)"""
    L = plan.problem.num_layers
    if sorted(run.backward_starts) != list(range(-1, L)):
        return None
    rows = plan.evaluation().gpu_rows  # at timeline.positions(): head, backward of L-1 ... 0
    xs = [run.backward_starts[j] for j in [-1, *reversed(range(L))]] + [run.samples[-1][0]]
    ys = [r / GB for r in rows] + [rows[-1] / GB]
    return xs, ys


def rows_beside_plan(plan, run: DryRun) -> list[tuple[str, float, int]]:
    """(position, the plan's GPU row, the dry run's GPU peak over that position's ops) for each of the plan's
    rows (needs a run with timeline=True); empty where the positions were not all seen."""
    steps = _plan_rows_over_ops(plan, run)
    if steps is None:
        return []
    xs, ys = steps
    out = []
    for name, start, end, row in zip(positions(plan.problem.num_layers), xs, xs[1:], ys):
        live = [b.get(GPU, 0) for op, b in run.samples if start <= op < end]
        out.append((name, row * GB, max(live, default=0)))
    return out


def draw_timeline(plan, run: DryRun, path: str, title: str) -> None:
    """Bytes per device over the step's ops (forward | backward and optimizer), GPU above, host below, the
    plan's peaks beside them and the GPU budget as lines; written to `path` (PNG, SVG or PDF by its suffix)."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--timeline draws with matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op, _ in run.samples]
    pred = plan.predicted["peak_bytes"]
    rows = _plan_rows_over_ops(plan, run)
    fig, (gpu, host) = plt.subplots(2, 1, sharex=True, figsize=(11, 6), height_ratios=[2, 1])
    panels = ((gpu, GPU, "GPU", pred["gpu"], "tab:blue"), (host, HOST, "host", pred.get("host", 0.0), "tab:orange"))
    for ax, device, label, planned, color in panels:  # each side on its own scale: the host's is 10x the GPU's
        ax.step(ops, [live.get(device, 0) / GB for _, live in run.samples], where="post", color=color,
                label=f"{label} (dry run)")
        if planned and device == GPU and rows:
            ax.step(*rows, where="post", color=color, linestyle=":", label="GPU (plan, at each of its rows)")
        elif planned:
            ax.axhline(planned / GB, color=color, linestyle=":", label=f"{label} peak (plan)")
        ax.axvline(run.forward_ops, color="gray", linewidth=0.8)
        ax.set_ylabel("GB alive")
        ax.set_ylim(bottom=0)
    gpu.axhline(plan.problem.budget_bytes / GB, color="tab:red", linestyle="--", label="GPU budget")
    gpu.set_ylim(0, max(plan.problem.budget_bytes, pred["gpu"], run.peak_bytes["gpu"]) / GB * 1.08)
    gpu.text(run.forward_ops, gpu.get_ylim()[1] * 0.97, " backward", va="top", fontsize=8, color="gray")
    host.set_xlabel("ops of the step")
    gpu.set_title(title)
    for ax in (gpu, host):
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
