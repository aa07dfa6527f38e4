"""One owner of everything a memory plan moves: `MemoryRuntime(model, plan, options)`.

    runtime = MemoryRuntime(model, plan, options)     # places the model, starts the movers
    with runtime.step(n_micro):                        # the one saved-tensor hook is on inside
        forward_backward(...)
    grad_norm = runtime.clip_and_step()
    runtime.zero_grad()

It owns the copy streams (one device-to-host mover, one host-to-device mover, shared by all parts), the
single saved-tensor dispatcher (dispatch.py; only the innermost hook context runs, so there is exactly one),
every module and gradient hook (one HookSet, offload/hooks.py: the parts add callbacks, it installs them once,
in one documented order), the NVMe store, the arena block and the accounting; each part's worker thread
(the CPU AdamW step, weight fetches, NVMe I/O, the activation ring's I/O, the CPU movers) is closed with it.
The parts plug into it:

- optimizer state: torch AdamW (or GaLore AdamW, galore.py) on the device, or `OffloadedAdamW` (host or NVMe, stepped per layer during
  backward) on the device-to-host stream;
- weights: on the device, or `ParamStreamer` (host or NVMe, one layer ahead) on the host-to-device stream,
  its saved weight views packed by the dispatcher;
- activations: `ActivationRuntime` carrying out the plan's per-layer, per-class, per-chunk decisions through
  the dispatcher and the stash (stash.py), when the plan is to be executed.

It knows the Plan and tensors, not the trainer's config: what it needs of the config comes as RuntimeOptions.
Everything it sizes comes from the Plan object (its arena, `layer_regions()`, `nvme_ring_slots`,
`nvme_state_stagings`); of the planner it imports planner/plan.py alone, for the words plans are written in.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from longtune.planner.plan import GPU, NVME, RECOMPUTE, Arena

from .dispatch import SavedTensorDispatcher, storage_key
from .groups import decay_groups
from .hooks import HookSet
from .movers import Mover

if TYPE_CHECKING:
    from .galore import GaloreOptions

GB = 1e9


@dataclass
class RuntimeOptions:
    device: torch.device
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_grad_norm: Optional[float] = 1.0
    activations: bool = False  # carry out the plan's activation decisions (else autograd keeps them all)
    prefetch_depth: int = 1
    nvme_path: Optional[str] = None
    nvme_checksum: bool = True
    nvme_backend: str = "auto"
    cpu_adam: str = "auto"
    numa_optimizer: dict = field(default_factory=dict)  # HostPool NUMA kwargs per pool
    numa_weights: dict = field(default_factory=dict)
    numa_activations: dict = field(default_factory=dict)  # tier -> HostPool NUMA kwargs
    copy_delay_s: float = 0.0  # CPU movers only: slow every copy down (tests of the overlap logic)
    lagging_copies: bool = False  # CPU movers only: copies run as late as a CUDA stream may run them (movers.py)
    galore: Optional["GaloreOptions"] = None  # GaLore AdamW (on the device) instead of AdamW
    galore_layerwise: bool = False
    galore_fused_update: Optional[object] = None  # kernels/galore_update.galore_update where it runs (a GPU)
    # Data parallel where the optimizer takes each gradient during backward (offloaded, layer-wise GaLore): it
    # averages them over this group itself, as a DDP wrapper would too late.
    process_group: Optional[object] = None
    strategy_owns_state: bool = False  # FSDP2 / DeepSpeed place optimizer state and weights: AdamW on the device
    sequence: Optional[object] = None  # ulysses.SequenceGroup: this rank holds a shard of each sequence


class MemoryRuntime:
    def __init__(self, model: nn.Module, plan, options: RuntimeOptions):
        self.model, self.plan, self.options = model, plan, options
        self.device = device = torch.device(options.device)
        self.notes: list[str] = []
        self.d2h = Mover(device, "d2h", options.copy_delay_s, options.lagging_copies)
        self.h2d = Mover(device, "h2d", options.copy_delay_s, options.lagging_copies)
        self.dispatcher = SavedTensorDispatcher()
        self.hooks = HookSet()  # every component's module and gradient callbacks, installed once, in ROLES order
        self.store = None
        self.optimizer = None
        self.streamer = None
        self.activations = None
        self._closed = False
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # --- construction -----------------------------------------------------------------------------
    def _build(self) -> None:
        plan, o, model = self.plan, self.options, self.model
        opt_tier, params_tier = (GPU, GPU) if o.strategy_owns_state else (plan.optimizer_tier, plan.params_tier)
        act_tiers = {p for layer in plan.layers for d in layer.values() for p in d} - {GPU, RECOMPUTE} \
            if o.activations else set()
        if NVME in (opt_tier, params_tier) or NVME in act_tiers:
            from .nvme import NvmeStore

            self.store = NvmeStore(o.nvme_path, checksum=o.nvme_checksum, backend=o.nvme_backend)
            self.notes.append(f"nvme tier: {self.store.folder} ({self.store.backend_name}, "
                              f"{'O_DIRECT' if self.store.direct_io else 'buffered'}, "
                              f"checksums {'on' if o.nvme_checksum else 'off'})")
        if opt_tier == "gpu":
            _to_device(model, self.device)
            self.optimizer = _galore_adamw(model, o, self.hooks) if o.galore else _torch_adamw(model, o)
        elif o.galore:  # GaLore's moments on the host, its projections and weights on the device
            if params_tier != "gpu" or opt_tier != "cpu":
                raise ValueError(f"GaLore keeps its moments on the device or the host, not {opt_tier}")
            _to_device(model, self.device)
            self.optimizer = _galore_adamw(model, o, self.hooks, state_device=torch.device("cpu"))
            self.notes.append("optimizer: GaLore's moments on the host (stepped by the CPU, rank-r traffic)")
        else:
            self._offload_state(opt_tier, params_tier)
        # Parameters on the device are saved by autograd as they are; streamed ones go through the streamer.
        self.dispatcher.passthrough |= {storage_key(_local(p)) for p in model.parameters() if p.numel()}
        self.dispatcher.params = self.streamer
        self.hooks.install()
        if o.activations:
            self._start_activations()

    def _offload_state(self, opt_tier: str, params_tier: str) -> None:
        from .cpu_adam import CpuAdamW
        from .optimizer import OffloadedAdamW
        from .params import ParamStreamer

        o, model = self.options, self.model
        if params_tier == "gpu":
            _to_device(model, self.device)
        cpu_adam = CpuAdamW(o.cpu_adam)
        # Built while every weight is still in the model: the master copy starts from them.
        self.optimizer = OffloadedAdamW(model, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                        clip_grad_norm=o.clip_grad_norm, tier=opt_tier, nvme_store=self.store,
                                        nvme_stagings=self.plan.nvme_state_stagings, cpu_adam=cpu_adam,
                                        device=self.device, copy_stream=self.d2h.stream, hooks=self.hooks,
                                        process_group=o.process_group, **o.numa_optimizer,
                                        # a CPU device's cores would run the update beside the compute; the
                                        # lagging-device mode imitates a GPU's overlap, worker thread included
                                        inline=self.device.type == "cpu" and not o.lagging_copies)
        if params_tier != "gpu":
            self.streamer = ParamStreamer(model, self.device, tier=params_tier, nvme_store=self.store,
                                          mover=self.h2d, hooks=self.hooks, **o.numa_weights)
            self.optimizer.set_weight_writers(self.streamer.writers())
            self.streamer.wait_update = self.optimizer.wait_group
        self.notes.append(f"optimizer on {opt_tier} ({cpu_adam.backend_name} AdamW, stepped per layer during backward)"
                          + (f"; decoder weights streamed from {params_tier}" if params_tier != "gpu" else ""))

    def _start_activations(self) -> None:
        from .activations import ActivationRuntime, plan_places
        from .pinned import HostPool
        from .stash import ActivationStash

        plan, o = self.plan, self.options
        if o.prefetch_depth != plan.problem.prefetch_depth:
            raise ValueError(f"prefetch depth {o.prefetch_depth}, but the plan's arena and NVMe ring are sized for depth "
                             f"{plan.problem.prefetch_depth}")
        layout = plan.layer_regions()
        arena = plan.arena if plan.arena is not None else Arena(0, {})
        block = torch.empty(max(int(arena.size_bytes), 0), dtype=torch.uint8, device=self.device)
        pools = {}
        for tier in sorted({t for regions in layout for t in regions} - {NVME}):
            slots = [(f"act/{l}", (regions[tier],), torch.uint8) for l, regions in enumerate(layout) if tier in regions]
            pools[tier] = HostPool(slots, name=f"activations-{tier}", **o.numa_activations.get(tier, {}))
        self._pools = pools
        stash = ActivationStash(self.device, layout, block, arena, self.d2h, self.h2d, pools, self.store,
                                o.prefetch_depth, plan.nvme_ring_slots)
        self.dispatcher.stash = stash
        self.activations = ActivationRuntime(self.model, plan_places(plan.layers), self.dispatcher, stash,
                                             o.prefetch_depth, sequence=o.sequence)
        off = sum(sum(r.values()) for r in layout)
        chunks = plan.problem.chunks
        self.notes.append(f"activations: the plan's decisions run per layer and chunk ({chunks} chunk{'s' if chunks > 1 else ''}); "
                          f"arena {block.numel() / GB:.3f} GB on the device, {off / GB:.3f} GB off it")

    @property
    def reduces_gradients(self) -> bool:
        """The optimizer averages the gradients over the data-parallel ranks itself (no DDP wrapper)."""
        return self.options.process_group is not None

    # --- the step ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, micro_batches: int):
        """Around the forward and backward passes of one optimizer step."""
        if hasattr(self.optimizer, "expect_backwards"):
            self.optimizer.expect_backwards(micro_batches)
        self._micro_batches = micro_batches
        with self.dispatcher.hooks():
            yield

    def clip_and_step(self):
        """Clip by the global norm (train.clip_grad_norm) and step; returns the norm before clipping."""
        if hasattr(self.optimizer, "clip_and_step"):
            return self.optimizer.clip_and_step()
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.options.clip_grad_norm or math.inf)
        self.optimizer.step()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # --- what it did --------------------------------------------------------------------------------
    def traffic(self) -> dict[str, float]:
        """Running totals: GB moved each way, GB read/written on NVMe, seconds compute waited on the movers."""
        opt, streamer, stash = self.optimizer, self.streamer, self.dispatcher.stash
        if not hasattr(opt, "bytes_to_host") and stash is None:
            return {}
        to_device = getattr(opt, "bytes_to_device", 0) + (streamer.bytes_fetched if streamer else 0)
        to_host = getattr(opt, "bytes_to_host", 0)
        wait = getattr(opt, "wait_s", 0.0) + (streamer.wait_s if streamer else 0.0)
        if stash is not None:
            to_device += stash.bytes_to_device
            to_host += stash.bytes_to_host
            wait += self.h2d.stall_s() + self.d2h.stall_s()
        totals = {"to_device_gb": to_device / GB, "to_host_gb": to_host / GB, "offload_wait_s": wait}
        if self.store is not None:
            totals |= {"nvme_read_gb": self.store.bytes_read / GB, "nvme_write_gb": self.store.bytes_written / GB}
        return totals

    def time_metrics(self) -> dict[str, float]:
        """The plan's predicted step time for the last step's micro-batches (`time_plan_s`, beside the loop's measured
        `step_time_s`) and its recompute share (`recompute_plan_s`, beside the measured `recompute_s`; and by part,
        `recompute_plan_pre_s` beside `recompute_pre_s`, post likewise). The plan
        prices one micro-batch (compute, recompute, exposed transfers) and the state's time once a step."""
        pred = self.plan.predicted if self.plan is not None else {}
        if not pred.get("step_time_s"):
            return {}
        n = getattr(self, "_micro_batches", 1)
        per_micro = pred.get("compute_s", 0.0) + pred.get("recompute_s", 0.0) + pred.get("exposed_transfer_s", 0.0)
        return {"time_plan_s": n * per_micro + pred.get("state_s", 0.0),
                "recompute_plan_s": n * pred.get("recompute_s", 0.0),
                **{f"recompute_plan_{part}_s": n * s for part, s in self.plan.recompute_by_part().items()}}

    def memory_metrics(self) -> dict[str, float]:
        """Saved-activation memory per tier: measured peak (since the last call) beside the plan's prediction; and the
        step time the plan predicts (time_metrics)."""
        if self.activations is None:  # no memory plan of this run's activations: no time model for its device either
            return {}
        r = self.dispatcher.residency
        pred = self.plan.predicted
        ev_tiers = {t.name: sum(self.plan.problem.chunk_bytes[c] * d.get(t.name, 0)
                                for layer in self.plan.layers for c, d in layer.items())
                    for t in self.plan.problem.tiers}
        out = {"mem_plan_gpu_gb": pred.get("activation_peak_bytes", 0.0) / GB, "mem_measured_gpu_gb": r.device_peak / GB}
        for tier, nbytes in ev_tiers.items():
            if nbytes or r.peak.get(tier):
                out[f"mem_plan_{tier}_gb"] = nbytes / GB
                out[f"mem_measured_{tier}_gb"] = r.peak.get(tier, 0) / GB
        recompute = self.activations.take_recompute_s()
        out["recompute_s"] = sum(recompute.values())
        out |= {f"recompute_{part}_s": s for part, s in recompute.items()}
        if self.dispatcher.stash.unplanned_bytes:
            out["mem_unplanned_gb"] = self.dispatcher.stash.unplanned_bytes / GB
        if self.device.type == "cuda":  # everything on the device, the plan's rows against the allocator's peak
            out["mem_plan_gpu_total_gb"] = pred["peak_bytes"]["gpu"] / GB
            out["mem_measured_gpu_total_gb"] = torch.cuda.max_memory_allocated(self.device) / GB
        r.reset_peaks()
        return out | self.time_metrics()

    def materialized(self):
        """Every weight reachable through the model (for checkpoint save and load)."""
        return self.streamer.materialized() if self.streamer is not None else contextlib.nullcontext()

    def close(self) -> None:
        """Stop the movers and remove the NVMe scratch files, whatever fails on the way."""
        if self._closed:
            return
        self._closed = True
        self.hooks.remove()
        errors = []
        parts = [self.activations, self.dispatcher.stash, self.optimizer if hasattr(self.optimizer, "close") else None,
                 self.streamer, self.store, self.d2h, self.h2d, *getattr(self, "_pools", {}).values()]
        for part in parts:
            if part is not None:
                try:
                    part.close()
                except Exception as e:  # noqa: BLE001 -- report the first, after closing the rest
                    errors.append(e)
        if errors:
            raise errors[0]


def _local(p: torch.Tensor) -> torch.Tensor:
    """A parameter's own storage (an FSDP2 DTensor's local shard)."""
    return p.to_local() if hasattr(p, "to_local") else p


def _galore_adamw(model: nn.Module, o: RuntimeOptions, hooks: HookSet, state_device=None) -> torch.optim.Optimizer:
    from .galore import GaloreAdamW

    optimizer = GaloreAdamW(model.named_parameters(), o.galore, lr=o.lr, betas=o.betas, eps=o.eps,
                            weight_decay=o.weight_decay, clip_grad_norm=o.clip_grad_norm,
                            fused_update=o.galore_fused_update, state_device=state_device,
                            process_group=o.process_group)
    if o.galore_layerwise:
        optimizer.attach_layerwise(hooks)
    return optimizer


def _torch_adamw(model: nn.Module, o: RuntimeOptions) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-D tensors), as is standard; the same two groups, in the same
    # order, as OffloadedAdamW, so checkpoints move between tiers.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = decay_groups(params, o.weight_decay, drop_empty=False)  # as checkpoints written so far hold them
    # The fused kernel (CUDA and CPU) is torch's fastest AdamW, and the one the offloaded optimizer runs on
    # the host: the same update rule bit for bit, so moving state off the GPU changes nothing.
    fused = all(p.device.type in ("cuda", "cpu") for p in params)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=fused or None)


def _to_device(model: nn.Module, device: torch.device) -> None:
    """model.to(device), where anything is elsewhere: a dry run builds its fake model on the device already, and
    Module.to would swap every fake parameter for itself, which torch refuses."""
    if any(t.device != device for t in (*model.parameters(), *model.buffers())):
        model.to(device)
