"""AdamW with fp32 master weights and moments off the GPU, stepped layer by layer during backward.

Per decoder layer (a `ParamGroup`): gradients leave the GPU the moment autograd
has accumulated them (post-accumulate-grad hooks), are summed over micro-batches
in host fp32, and once the layer's last gradient of the step is in, a worker
thread runs the CPU AdamW step on that layer (Fuyou) while backward goes on
with the layers below. Updated weights go back to the GPU on a copy stream;
each layer's forward waits only for its own update.

Gradient clipping needs the global norm before any update, so with clipping
the workers compute each layer's norm during backward and the updates start
right after it, in forward order, so the next forward waits on layer 0 only.

State lives on the host (a `HostPool`, pinned when a GPU exists) or on NVMe
(an `NvmeStore`, read and written through `nvme_stagings` bounded staging buffers: as many as the plan counts,
Plan.nvme_state_stagings).
`state_dict()` has torch AdamW's format, so runs move between tiers on resume.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Callable, Optional

import torch
from torch import nn

from .cpu_adam import AdamWHyper, CpuAdamW
from .groups import ParamGroup, decay_groups, flat_offsets, param_groups
from .hooks import HookSet
from .movers import InlineExecutor, worker_pool
from .pinned import HostPool, exact_pinned_empty

WeightWriter = Callable[[ParamGroup, list[torch.Tensor]], None]


class OffloadedAdamW(torch.optim.Optimizer):
    def set_weight_writers(self, writers: dict[int, WeightWriter]) -> None:
        """Where updated weights of some groups go instead of their GPU parameters (the parameter streamer)."""
        self.writers = dict(writers)

    def __init__(self, model: nn.Module, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 clip_grad_norm: Optional[float] = None, tier: str = "cpu", nvme_store=None, nvme_stagings: int = 0,
                 cpu_adam: Optional[CpuAdamW] = None, numa_nodes=None, interleave: bool = False,
                 numa_local_share: Optional[float] = None,
                 weight_writers: Optional[dict[int, WeightWriter]] = None, device: Optional[torch.device] = None,
                 copy_stream=None, hooks: Optional[HookSet] = None, process_group=None, inline: bool = False):
        if tier not in ("cpu", "nvme"):
            raise ValueError(f"optimizer tier must be cpu or nvme, not {tier!r}")
        if tier == "nvme" and nvme_store is None:
            raise ValueError("the nvme optimizer tier needs an NvmeStore")
        if tier == "nvme" and nvme_stagings < 1:
            raise ValueError("the nvme optimizer tier needs nvme_stagings >= 1 (the plan's nvme_state_stagings)")
        self.nvme_stagings = nvme_stagings if tier == "nvme" else 0
        self.groups = param_groups(model)
        # The order torch's clip_grad_norm_(model.parameters()) stacks per-tensor norms in: it sets the rounding.
        self._norm_order = [id(p) for p in model.parameters() if p.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad]
        # The same two torch param groups, in the same order, as the in-memory optimizer (checkpoints are
        # interchangeable): decay on matrices, none on norms and biases.
        super().__init__(decay_groups(params, weight_decay), dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.tier, self.store, self.clip = tier, nvme_store, clip_grad_norm
        self.cpu_adam = cpu_adam or CpuAdamW()
        self.writers = weight_writers or {}
        self.device = torch.device(device) if device is not None else params[0].device  # where training runs
        self.cuda = self.device.type == "cuda"
        # The memory runtime's device-to-host stream (one owner of the copy streams); a private one when alone.
        self.copy_stream = copy_stream if copy_stream is not None or not self.cuda else torch.cuda.Stream(self.device)
        # Data parallel: a DDP wrapper would reduce after this optimizer has taken the gradients off the device,
        # so each gradient is averaged over the ranks in its own hook, before it leaves.
        self.process_group = process_group
        self.world = torch.distributed.get_world_size(process_group) if process_group is not None else 1
        self.steps_done = 0
        self.bytes_to_host = self.bytes_to_device = 0  # gradients out, updated weights back
        self.wait_s = 0.0  # the training thread blocked on a layer's update: CPU step time not hidden
        self._torch_group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self._offsets = {g.index: flat_offsets(g.shapes) for g in self.groups}
        # OpenMP's thread count is per thread: without this the worker would split the fused kernel
        # differently from the main thread, and chunk edges change the rounding of a few elements.
        # `inline`: each layer's norms and update run on the training thread when launched (a CPU device, whose
        # cores the update would share: two OpenMP teams on the same cores took 1.5 s more a step than one,
        # SmolLM2 at 2,048 tokens on 2 cores); their time is then time the training thread was blocked.
        self.inline = inline
        self._worker = InlineExecutor() if inline else worker_pool("adam", initializer=torch.set_num_threads,
                                                                   initargs=(torch.get_num_threads(),))
        self._pending: dict[int, Future] = {}  # group -> its update in flight
        self._build_state(numa_nodes, interleave, numa_local_share)
        self._begin(1)
        # The memory runtime's HookSet (installed once every component has added to it), or one of its own.
        self._hooks = hooks if hooks is not None else HookSet()
        self._add_hooks(self._hooks)
        if hooks is None:
            self._hooks.install()

    # --- state -----------------------------------------------------------------------------
    def _build_state(self, numa_nodes, interleave, numa_local_share=None) -> None:
        biggest = max(g.numel for g in self.groups)
        # Gradients are summed on the host in fp32 whatever the tier: the GPU keeps no gradient past its hook.
        layout = [(f"grad/{g.index}", (g.numel,), torch.float32) for g in self.groups]
        if self.tier == "cpu":
            layout += [(f"state/{g.index}", (3, g.numel), torch.float32) for g in self.groups]
        self.pool = HostPool(layout, numa_nodes=numa_nodes, interleave=interleave, numa_local_share=numa_local_share,
                             name="optimizer")
        # Staging k holds the groups k, k + S, ... in turn: it is sized for the largest of them (group 0, the weights
        # outside the decoder layers, is often several layers' size). A micro-batch's gradient before it is summed
        # is made with the first step of more than one micro-batch. (The planner counts both:
        # problem.optimizer_host_buffer_bytes.)
        S = self.nvme_stagings
        self._staging = [exact_pinned_empty((3 * max((g.numel for g in self.groups if g.index % S == k), default=1),),
                                            torch.float32) for k in range(S)]
        self._staging_busy: list[Optional[Future]] = [None] * S
        self._biggest, self._incoming = biggest, None
        for g in self.groups:
            state = self._state_buffer(g, self._slot(g))
            with torch.no_grad():
                for master, p in zip(self._unflat(state[0], g), g.params):
                    master.copy_(self._weights_of(g, p))
            state[1:].zero_()
            if self.tier == "nvme":
                self.store.write(self._key(g), state)

    def _weights_of(self, g: ParamGroup, p: nn.Parameter) -> torch.Tensor:
        if p.shape == g.shapes[next(i for i, q in enumerate(g.params) if q is p)]:  # in the model (also a streamed one, while materialized)
            return p.detach()
        return self.writers[g.index].read(p)  # a streamed layer away from the GPU: read its home

    def _key(self, g: ParamGroup) -> str:
        return f"adamw-{g.index}"

    def _slot(self, g: ParamGroup) -> int:
        """The NVMe staging group g's state passes through."""
        return g.index % self.nvme_stagings if self.tier == "nvme" else 0

    def _state_buffer(self, g: ParamGroup, slot: int) -> torch.Tensor:
        """(3, numel) fp32: master weights, exp_avg, exp_avg_sq. On NVMe, a staging buffer the caller fills."""
        if self.tier == "cpu":
            return self.pool.tensor(f"state/{g.index}")
        return self._staging[slot][: 3 * g.numel].view(3, g.numel)

    def _unflat(self, flat: torch.Tensor, g: ParamGroup) -> list[torch.Tensor]:
        return [flat[o: o + s.numel()].view(s) for o, s in zip(self._offsets[g.index], g.shapes)]

    # --- during backward ---------------------------------------------------------------------
    def _begin(self, micro_batches: int) -> None:
        self._micro_batches = micro_batches
        if micro_batches > 1 and self._incoming is None:  # where the later micro-batches' gradients land
            self._incoming = exact_pinned_empty((self._biggest,), torch.float32)
        self._seen = {id(p): 0 for g in self.groups for p in g.params}
        self._left = {g.index: len(g.params) * micro_batches for g in self.groups}
        self._norms: dict[int, Future] = {}
        self._launched: set[int] = set()
        self._step_results: list[Future] = []
        self._grad_events: dict[int, list] = {g.index: [] for g in self.groups}

    def expect_backwards(self, micro_batches: int) -> None:
        """Call before the step's first backward: how many micro-batches feed this step."""
        start = time.perf_counter()
        self.synchronize()
        self.wait_s += time.perf_counter() - start
        self._begin(micro_batches)

    def _add_hooks(self, hooks: HookSet) -> None:
        """Each gradient as it is accumulated, and a gate before each group's forward (offload/hooks.py)."""
        for g in self.groups:
            for i, p in enumerate(g.params):
                hooks.on_grad(p, "optimizer", self._grad_hook(g, i))
            hooks.before_forward(g.module, "optimizer", lambda index=g.index: self.before_forward(index))

    def _grad_hook(self, g: ParamGroup, i: int):
        def hook(p: nn.Parameter) -> None:
            if self.world > 1:
                torch.distributed.all_reduce(p.grad, group=self.process_group)
                p.grad.div_(self.world)
            first = self._seen[id(p)] == 0
            self._seen[id(p)] += 1
            off = self._offsets[g.index][i]
            total = self.pool.tensor(f"grad/{g.index}")[off: off + p.grad.numel()].view(p.grad.shape)
            # Later micro-batches land beside the sum and are added on the host, in fp32 as torch adds on the GPU.
            dest = total if first else self._incoming[: total.numel()].view(total.shape)
            if self.cuda:
                self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.copy_stream):
                    dest.copy_(p.grad, non_blocking=True)
                    p.grad.record_stream(self.copy_stream)
                    event = torch.cuda.Event()
                    event.record()
                self._grad_events[g.index].append(event)
            else:
                dest.copy_(p.grad)
            self.bytes_to_host += p.grad.numel() * p.grad.element_size()
            p.grad = None  # the GPU holds no gradient past this point
            if not first:
                self._wait_events(g.index)
                total.add_(dest)
            self._left[g.index] -= 1
            if self._left[g.index] == 0:
                self._launch_ready(g)
        return hook

    def _wait_events(self, index: int) -> None:
        for event in self._grad_events[index]:
            event.synchronize()
        self._grad_events[index] = []

    def _launch_ready(self, g: ParamGroup) -> None:
        if self.clip is not None:
            self._norms[g.index] = self._submit(self._group_norms, g)
        else:
            self._launch_step(g, None)

    def _submit(self, fn, *args) -> Future:
        """fn(*args) on the worker; inline, on this thread, counted as time the training thread was blocked."""
        start = time.perf_counter()
        future = self._worker.submit(fn, *args)
        if self.inline:
            self.wait_s += time.perf_counter() - start
        return future

    def _group_norms(self, g: ParamGroup) -> dict[int, torch.Tensor]:
        self._wait_events(g.index)
        grads = self._unflat(self.pool.tensor(f"grad/{g.index}"), g)
        return {id(p): torch.linalg.vector_norm(grads[i], 2.0) for i, p in enumerate(g.params) if self._seen[id(p)]}

    # --- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def clip_and_step(self):
        """After the step's last backward: clip by the global norm (if set) and finish every layer's update.

        Returns the gradient norm before clipping, as torch's clip_grad_norm_ does; the
        updates of the layers may still be running (each forward waits for its own).
        """
        for g in self.groups:  # parameters that got no gradient this step are skipped, as torch does
            if g.index not in self._launched and g.index not in self._norms:
                self._launch_ready(g)
        if self.clip is None:
            total = _LazyNorm(list(self._step_results), self._norm_order)
        else:
            total = _total_norm({k: v for f in self._norms.values() for k, v in f.result().items()}, self._norm_order)
            coef = torch.clamp(self.clip / (total + 1e-6), max=1.0)
            for g in self.groups:  # forward order: layer 0's update is the first the next forward needs
                self._launch_step(g, coef)
        self.steps_done += 1
        self._opt_called = True  # what torch's LR schedulers check to know the optimizer stepped first
        return total

    def _launch_step(self, g: ParamGroup, coef: Optional[torch.Tensor]) -> None:
        self._launched.add(g.index)
        lrs = [self.param_groups[self._torch_group_of[id(p)]]["lr"] for p in g.params]  # read now: the scheduler moves on
        self._pending[g.index] = self._submit(self._step_group, g, coef, lrs, self.steps_done + 1)
        self._step_results.append(self._pending[g.index])

    def _step_group(self, g: ParamGroup, coef, lrs: list[float], step: int) -> torch.Tensor:
        self._wait_events(g.index)
        slot = self._slot(g)
        if self.tier == "nvme":
            if self._staging_busy[slot] is not None:
                self._staging_busy[slot].result()  # its write-back, and the H2D copy that read it
            state = self._state_buffer(g, slot)
            self.store.read(self._key(g), state)
        else:
            state = self._state_buffer(g, 0)
        masters, avgs, sqs = (self._unflat(state[k], g) for k in range(3))
        grads = self._unflat(self.pool.tensor(f"grad/{g.index}"), g)
        live = [i for i, p in enumerate(g.params) if self._seen[id(p)]]
        norms = {id(g.params[i]): torch.linalg.vector_norm(grads[i], 2.0) for i in live} if coef is None else {}
        if coef is not None:
            for i in live:
                grads[i].mul_(coef)
        beta1, beta2 = self.defaults["betas"]
        for wd in {self.param_groups[self._torch_group_of[id(g.params[i])]]["weight_decay"] for i in live}:
            idx = [i for i in live if self.param_groups[self._torch_group_of[id(g.params[i])]]["weight_decay"] == wd]
            hyper = AdamWHyper(lr=lrs[idx[0]], betas=(beta1, beta2), eps=self.defaults["eps"], weight_decay=wd)
            self.cpu_adam.step([masters[i] for i in idx], [grads[i] for i in idx], [avgs[i] for i in idx],
                               [sqs[i] for i in idx], step, hyper)
        self._write_weights(g, masters)
        if self.tier == "nvme":
            self._staging_busy[slot] = self.store.write_async(self._key(g), state)
        return norms

    def _write_weights(self, g: ParamGroup, masters: list[torch.Tensor]) -> None:
        writer = self.writers.get(g.index)
        if writer is not None:
            writer(g, masters)
            return
        self.bytes_to_device += sum(p.numel() * p.element_size() for p in g.params)
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                for p, m in zip(g.params, masters):
                    p.data.copy_(m, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            event.synchronize()  # the master buffer (NVMe staging) is reused after this
        else:
            for p, m in zip(g.params, masters):
                p.data.copy_(m)

    def before_forward(self, index: int) -> None:
        """Group `index`'s forward is about to run: its update must have landed."""
        start = time.perf_counter()
        self.wait_group(index)
        self.wait_s += time.perf_counter() - start

    def wait_group(self, index: int) -> None:
        """Block until the update of group `index` has landed (raises what the worker raised)."""
        fut = self._pending.get(index)  # not popped: the fetch thread may wait on it too
        if fut is not None:
            self._await(fut)

    def synchronize(self) -> None:
        for index in list(self._pending):
            self.wait_group(index)
        self._pending.clear()
        for fut in self._staging_busy:
            if fut is not None:
                self._await(fut)

    def _await(self, fut: Future) -> None:
        try:
            fut.result()
        except BaseException:
            # After a failed update the run stops: report the error once, not again at every later wait.
            self._pending.clear()
            self._staging_busy = [None] * self.nvme_stagings
            raise

    def step(self, closure=None):  # the torch API: a whole step with no overlap
        if closure is not None:
            raise ValueError("OffloadedAdamW.step takes no closure")
        self.clip_and_step()
        self.synchronize()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # gradients never stay on the parameters

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch AdamW's format (plus fp32 `master` where the weights are not fp32)."""
        self.synchronize()
        index = {id(p): i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        state = {}
        for g in self.groups:
            flat = self._read_state(g)
            for p, master, avg, sq in zip(g.params, *(self._unflat(flat[k], g) for k in range(3))):
                entry = {"step": torch.tensor(float(self.steps_done)), "exp_avg": avg.clone(), "exp_avg_sq": sq.clone()}
                if p.dtype != torch.float32:  # bf16 weights: the fp32 master is the state that matters
                    entry["master"] = master.clone()
                state[index[id(p)]] = entry
        groups = [{k: v for k, v in group.items() if k != "params"} | {"params": [index[id(p)] for p in group["params"]]}
                  for group in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        self.synchronize()
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state does not match the model's parameters")
        for mine, saved in zip(self.param_groups, groups):
            mine.update({k: v for k, v in saved.items() if k != "params"})
        params = [p for group in self.param_groups for p in group["params"]]
        by_param = {id(params[int(i)]): s for i, s in state_dict["state"].items()}
        steps = {int(s["step"]) for s in state_dict["state"].values()}
        self.steps_done = steps.pop() if len(steps) == 1 else 0
        for g in self.groups:
            flat = self._read_state(g)
            for p, master, avg, sq in zip(g.params, *(self._unflat(flat[k], g) for k in range(3))):
                s = by_param.get(id(p))
                master.copy_(s["master"] if s is not None and "master" in s else self._weights_of(g, p))
                avg.copy_(s["exp_avg"]) if s is not None else avg.zero_()
                sq.copy_(s["exp_avg_sq"]) if s is not None else sq.zero_()
            if self.tier == "nvme":
                self.store.write(self._key(g), flat)

    def _read_state(self, g: ParamGroup) -> torch.Tensor:
        if self.tier == "cpu":
            return self.pool.tensor(f"state/{g.index}")
        flat = torch.empty(3, g.numel, dtype=torch.float32)
        self.store.read(self._key(g), flat)
        return flat

    def close(self) -> None:
        try:
            self.synchronize()
        finally:
            self._hooks.remove()  # the runtime's too: the run is over
            self._worker.shutdown(wait=True)
            self.pool.close()


def _total_norm(norms: dict[int, torch.Tensor], order: list[int]) -> torch.Tensor:
    """torch's clip_grad_norm_: the 2-norm of the per-tensor norms, stacked in parameter order."""
    ordered = [norms[i] for i in order if i in norms]
    return torch.linalg.vector_norm(torch.stack(ordered), 2.0) if ordered else torch.zeros(())


class _LazyNorm:
    """The total gradient norm when it is known only once every layer's step has run (no clipping)."""

    def __init__(self, futures: list[Future], order: list[int]):
        self.futures, self.order = futures, order

    def __float__(self) -> float:
        return float(_total_norm({k: v for f in self.futures for k, v in f.result().items()}, self.order))
