"""GaLore AdamW: Adam moments of each target weight live in a rank-r projection of its gradient.

    opt = GaloreAdamW(model.named_parameters(), GaloreOptions(rank=128), lr=1e-4)
    opt.step()                       # after backward, as any optimizer
    opt.attach_layerwise()           # or: each weight steps in its own post-accumulate-grad hook

The update is GaLore's (galore-torch's AdamW, itself transformers' AdamW): for a target weight W with gradient
G and basis B, g = project(G), m, v the moments of g, W -= lr * sqrt(1 - b2^t) / (1 - b1^t) *
scale * project_back(m / (sqrt(v) + eps)), then W -= lr * wd * W. Every other parameter gets the same update
without the projection. Moments and bases are in the weight's dtype, as galore-torch keeps them.

What galore-torch does not do, this does:
- state is plain tensors and integers (bases, moments, step and refresh counters; for the `random` projector
  only integers), so a checkpoint loads with `weights_only=True` and resumes exactly;
- refreshes are staggered (`stagger`): weight i refreshes at steps where (step + offset_i) % gap == 0, so the
  SVDs of all layers never land in one step;
- the moments can be rotated into the new basis at a refresh (`on_refresh: rotate`) instead of kept;
- layer-wise updates (`attach_layerwise`) work with gradient accumulation: between refreshes each micro-batch's
  gradient is projected and summed in the rank-r space and the full gradient freed at once; a refresh step
  sums the full gradient (only the weights refreshing then, 1/gap of them when staggered) so the basis is the
  one the non-layer-wise run computes;
- and with data parallelism (`process_group`): the hooks average each gradient over the ranks after it is
  complete, a target weight's in its rank-r projection between refreshes, so the bytes on the wire shrink
  with the state (a DDP wrapper would reduce full gradients in full-size buckets that outlive the hooks);
  under FSDP2 (row-sharded DTensors) a right projection of the shard is the shard of the projection and a
  left one a partial sum completed by one small all-reduce;
- moments in 8 bits (`eight_bit`, bitsandbytes' blockwise quantisation), or on the host (`state_device`,
  rank-r copies each way), and the weight update fused in one kernel (`fused_update`, kernels/galore_update.py,
  which the trainer passes on a GPU).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .groups import decay_groups
from .hooks import HookSet
from .galore_projection import (PROJECTORS, project, project_back, random_basis, randomized_basis,
                                rotate_moments, side_of, svd_basis)

MIN_8BIT_NUMEL, BLOCK_8BIT = 4096, 256  # as bitsandbytes' 8-bit optimizers: smaller moments stay full precision
DEFAULT_TARGETS = ("*.self_attn.*_proj.weight", "*.mlp.*_proj.weight")  # decoder layers' attention and MLP


@dataclass(frozen=True)
class GaloreOptions:
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    projector: str = "svd"
    on_refresh: str = "keep"  # keep the moments as they are (the paper) | rotate them into the new basis
    stagger: bool = True
    seed: int = 0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    eight_bit: bool = False  # moments stored blockwise-quantised to 8 bits (bitsandbytes' dynamic maps)

    def __post_init__(self):
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.on_refresh not in ("keep", "rotate"):
            raise ValueError(f"on_refresh must be keep or rotate, got {self.on_refresh!r}")


def galore_targets(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _bnb():
    try:
        import bitsandbytes.functional as F
    except ImportError:
        raise ValueError("optim.galore.eight_bit needs bitsandbytes: pip install bitsandbytes") from None
    return F


_CODES: dict = {}


# The state that lives on `state_device` when one is set (the moments, as they are or 8-bit); the rest (the step,
# the projection bases) stays with its parameter.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")


def _codes(device) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' dynamic quantisation maps: signed for the first moment, unsigned for the second."""
    if device not in _CODES:
        F = _bnb()
        _CODES[device] = (F.create_dynamic_map(signed=True).to(device), F.create_dynamic_map(signed=False).to(device))
    return _CODES[device]


def _is_sharded(t) -> bool:
    return hasattr(t, "device_mesh")  # an FSDP2 DTensor, sharded by rows (Shard(0))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_sharded(t) else t


def _full(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.full_tensor() if t is not None and _is_sharded(t) else t  # all-gathered, for a refresh (rare)


def _rows(p) -> slice:
    """The rows of p this rank holds: FSDP2 shards dim 0 as torch.chunk does; all of them otherwise."""
    if not _is_sharded(p):
        return slice(None)
    per = -(-p.shape[0] // p.device_mesh.size())
    start = min(p.device_mesh.get_local_rank() * per, p.shape[0])
    return slice(start, min(start + per, p.shape[0]))


class GaloreAdamW(torch.optim.Optimizer):
    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], options: GaloreOptions,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, clip_grad_norm: Optional[float] = None, process_group=None,
                 fused_update=None, state_device: Optional[torch.device] = None):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        targets = set(galore_targets([n for n, p in named if p.ndim == 2], options.targets))
        if not targets:
            example = next((n for n, p in named if p.ndim == 2), "none")
            raise ValueError(f"optim.galore.targets {list(options.targets)} match no 2-D weight (names look like {example})")
        galore = [p for n, p in named if n in targets]
        rest = [p for n, p in named if n not in targets]
        groups = [{"params": galore, "galore": True, "weight_decay": weight_decay}]
        super().__init__([g for g in groups if g["params"]] + decay_groups(rest, weight_decay, galore=False), dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.options, self.clip_grad_norm = options, clip_grad_norm
        # Data parallel without a DDP wrapper: the gradients are averaged over `process_group` here, a target
        # weight's in its rank-r projection (r/n of the bytes) between refreshes.
        self.process_group = process_group
        # kernels/galore_update.py's signature: (w, exp_avg, exp_avg_sq, basis, side, step_size, scale, eps,
        # decay), in place on w; used for unsharded, full-precision target weights (the trainer passes it on a GPU)
        self.fused_update = fused_update
        # Moments on the host (memory.optimizer=cpu): each update sends the (projected) gradient there, the CPU
        # steps the moments and sends the Adam direction back; bases, projections and the weight update stay on
        # the device. For a target weight both copies are rank-r: r/n of AdamW's offload traffic.
        self.state_device = torch.device(state_device) if state_device is not None else None
        self.bytes_to_host = self.bytes_to_device = 0
        self.world = torch.distributed.get_world_size(process_group) if process_group is not None else 1
        self.target_names = sorted(targets)
        self._index = {p: i for i, p in enumerate(galore)}  # seeds and stagger offsets
        self._group = {p: g for g in self.param_groups for p in g["params"]}
        self._hooks: Optional[HookSet] = None  # layer-wise: the HookSet its gradient callbacks are in
        self._micro, self._seen, self._low = 1, {}, {}
        self._sq_norm: Optional[torch.Tensor] = None
        self._norm_group = None
        self._last_random = None  # ((id of the param, refresh count), basis) of the `random` projector

    @property
    def layerwise(self) -> bool:
        return self._hooks is not None

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, then two repairs, without which a resumed run is not the run it continues:
        - it replaces the param-group dicts with new ones: `_group` still pointed at the old ones, so the updates
          read their learning rate from dicts the LR scheduler no longer sets (frozen at the rate the scheduler
          gave them when it was built: 0 at the start of a warmup, and the resumed run never moved again);
        - it casts every state tensor to its parameter's dtype, which fits Adam's moments but turns the 8-bit
          moments (uint8 codes, fp32 block scales) into floats: each tensor keeps the dtype it was saved with."""
        super().load_state_dict(state_dict)
        self._group = {p: g for g in self.param_groups for p in g["params"]}
        params = dict(zip((i for g in state_dict["param_groups"] for i in g["params"]),
                          (p for g in self.param_groups for p in g["params"])))
        for i, saved in state_dict["state"].items():
            if i not in params:  # torch keeps such entries as they are
                continue
            state = self.state[params[i]]
            for k, v in saved.items():
                if torch.is_tensor(v) and state[k].dtype != v.dtype:
                    state[k] = v.to(state[k].device, copy=True)
                if self.state_device is not None and k in MOMENT_KEYS and state[k].device != self.state_device:
                    # torch's load moves state to its parameter's device; host moments (state_device) go back
                    moment = state[k].to(self.state_device)
                    state[k] = moment.pin_memory() if params[i].device.type == "cuda" else moment

    # --- the basis --------------------------------------------------------------------------------------
    def _offset(self, p) -> int:
        gap = self.options.update_proj_gap
        return (self._index[p] * gap) // len(self._index) % gap if self.options.stagger else 0

    def refresh_due(self, p) -> bool:
        """Whether this step makes a new basis for target weight p (and has not made it yet)."""
        state = self.state[p]
        step = int(state.get("step", 0))
        if not state.get("refreshes"):
            return True
        return (step + self._offset(p)) % self.options.update_proj_gap == 0 and state["basis_step"] != step

    def _basis(self, p) -> torch.Tensor:
        state, o = self.state[p], self.options
        if o.projector != "random":
            return state["basis"]
        refreshes = state["refreshes"]
        # Regenerated, never stored in the state; the last one is kept, so the projection and the update of one
        # step (made back to back, except across micro-batches of a layer-wise step) draw it once.
        key = (id(p), refreshes)
        if self._last_random is None or self._last_random[0] != key:
            self._last_random = (key, random_basis(tuple(p.shape), min(o.rank, *p.shape), o.seed, self._index[p],
                                                   refreshes, p.dtype, p.device))
        return self._last_random[1]

    @torch.no_grad()
    def _refresh(self, p, grad: Optional[torch.Tensor]) -> None:
        """A new basis (from the full gradient, except for `random`), the moments kept or rotated into it."""
        state, o = self.state[p], self.options
        rank = min(o.rank, *p.shape)
        rotate = o.on_refresh == "rotate" and bool(state.get("refreshes")) and state.get("step", 0) > 0
        old = self._basis(p) if rotate else None
        state["refreshes"] = int(state.get("refreshes", 0)) + 1
        state["basis_step"] = int(state.get("step", 0))
        if o.projector == "svd":
            state["basis"] = svd_basis(grad, rank)
        elif o.projector == "randomized":
            generator = torch.Generator().manual_seed((o.seed * 1_000_003 + self._index[p]) * 7919 + state["refreshes"])
            state["basis"] = randomized_basis(grad, rank, state.get("basis"), generator)
        if rotate:
            m, v = self._moments(state)
            rotate_moments(m, v, old, self._basis(p), side_of(p.shape))
            self._keep_moments(state, m, v)

    # --- the update --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update(self, p, g: torch.Tensor) -> None:
        """One Adam step of p from g: its gradient, or for a target weight its projected gradient."""
        state, group = self.state[p], self._group[p]
        replicated = _is_sharded(p) and group["galore"] and side_of(p.shape) == "left"  # the same on every rank
        g = g if group["galore"] else _local(g)
        device = g.device
        if self.state_device is not None and self.state_device != device:
            g = self._to_host(g)
        if not state.get("step"):
            state["step"] = 0
            zeros = torch.zeros_like(g, dtype=torch.float32 if self._eight_bit(g) else g.dtype)
            if zeros.device.type == "cpu" and device.type == "cuda":
                zeros = zeros.pin_memory()
            self._keep_moments(state, zeros, zeros.clone())
        if self.layerwise:  # the norm the loop logs: clip_and_step cannot compute it after backward
            sq = g.detach().float().pow(2).sum() / (p.device_mesh.size() if replicated else 1)
            self._sq_norm = sq if self._sq_norm is None else self._sq_norm + sq
            if _is_sharded(p):
                self._norm_group = p.device_mesh.get_group()
        beta1, beta2 = group["betas"]
        state["step"] += 1
        exp_avg, exp_avg_sq = self._moments(state)
        exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        if group["galore"] and self.fused_update is not None and "exp_avg_q" not in state and not _is_sharded(p) \
                and exp_avg.device == device:
            self.fused_update(p.data, exp_avg, exp_avg_sq, self._basis(p), side_of(p.shape), step_size,
                              self.options.scale, group["eps"], group["lr"] * group["weight_decay"])
            return
        update = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
        self._keep_moments(state, exp_avg, exp_avg_sq)
        update = update.to(g.dtype)  # 8-bit moments compute in fp32; the basis and the weight are in g's dtype
        if update.device != device:
            self.bytes_to_device += update.numel() * update.element_size()
            update = update.to(device, non_blocking=True)
        if group["galore"]:
            update = self._projected_back(p, update)
        w = _local(p)  # under FSDP2, this rank's rows
        w.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            w.add_(w, alpha=-group["lr"] * group["weight_decay"])

    def _to_host(self, g: torch.Tensor) -> torch.Tensor:
        self.bytes_to_host += g.numel() * g.element_size()
        if g.device.type == "cuda":  # pinned, so the copy is a DMA; synchronous: the CPU steps it next
            out = torch.empty(g.shape, dtype=g.dtype, pin_memory=True)
            return out.copy_(g)
        return g.to(self.state_device)

    # --- the moments: as they are, or 8-bit -------------------------------------------------------------
    def _eight_bit(self, g: torch.Tensor) -> bool:
        return self.options.eight_bit and g.numel() >= MIN_8BIT_NUMEL

    def _moments(self, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The two moments to compute with: the state's own tensors, or fp32 copies of the 8-bit ones."""
        if "exp_avg_q" not in state:
            return state["exp_avg"], state["exp_avg_sq"]
        F = _bnb()
        signed, unsigned = _codes(state["exp_avg_q"].device)
        return (F.dequantize_blockwise(state["exp_avg_q"], absmax=state["exp_avg_absmax"], code=signed, blocksize=BLOCK_8BIT),
                F.dequantize_blockwise(state["exp_avg_sq_q"], absmax=state["exp_avg_sq_absmax"], code=unsigned,
                                       blocksize=BLOCK_8BIT))

    def _keep_moments(self, state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
        if not self._eight_bit(m):
            state["exp_avg"], state["exp_avg_sq"] = m, v
            return
        F = _bnb()
        signed, unsigned = _codes(m.device)
        state["exp_avg_q"], qs = F.quantize_blockwise(m.float(), code=signed, blocksize=BLOCK_8BIT)
        state["exp_avg_absmax"] = qs.absmax
        state["exp_avg_sq_q"], qs = F.quantize_blockwise(v.float(), code=unsigned, blocksize=BLOCK_8BIT)
        state["exp_avg_sq_absmax"] = qs.absmax

    def _mean(self, t: torch.Tensor) -> torch.Tensor:
        """t averaged over the data-parallel ranks (in place); t itself without a process group."""
        if self.world > 1:
            torch.distributed.all_reduce(t, group=self.process_group)
            t.div_(self.world)
        return t

    def _projected(self, p, grad: torch.Tensor) -> torch.Tensor:
        """The (local) projection of p's gradient; under FSDP2 the gradient is p's row shard: a right projection
        of it is the rows of the projection, a left one a partial sum that the shards add up."""
        if self.refresh_due(p):
            self._refresh(p, _full(grad))
        side, basis = side_of(p.shape), self._basis(p)
        if side == "right":
            return project(_local(grad), basis, side)
        low = project(_local(grad), basis[_rows(p)], side)
        if _is_sharded(p):
            torch.distributed.all_reduce(low, group=p.device_mesh.get_group())
        return low

    def _projected_back(self, p, low: torch.Tensor) -> torch.Tensor:
        side, basis = side_of(p.shape), self._basis(p)
        return project_back(low, basis if side == "right" else basis[_rows(p)], side, self.options.scale)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        if self.layerwise:  # every update already ran during backward
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, self._projected(p, p.grad) if group["galore"] else p.grad)
        return loss

    def clip_and_step(self) -> torch.Tensor:
        """Clip by the global norm and step; returns the norm before clipping. Layer-wise, the updates ran in
        backward and the norm is that of the gradients they used (projected, for the target weights)."""
        if self.layerwise:
            self.step()  # nothing left to do, but LR schedulers count optimizer.step() calls
            if self._sq_norm is None:
                return torch.zeros(())
            if self._norm_group is not None:  # FSDP2: every rank summed its shards
                torch.distributed.all_reduce(self._sq_norm, group=self._norm_group)
            return self._sq_norm.sqrt()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p in params:
            self._mean(p.grad)
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm or math.inf)
        self.step()
        return norm

    # --- layer-wise ------------------------------------------------------------------------------------
    def attach_layerwise(self, hooks: Optional[HookSet] = None) -> None:
        """Step each parameter in its post-accumulate-grad hook, as soon as its last micro-batch's gradient is
        summed; a target weight's gradient is projected and freed at every micro-batch between refreshes."""
        if self.clip_grad_norm is not None:
            raise ValueError("layer-wise updates run during backward, before the global gradient norm is known: "
                             "clipping is impossible (set train.clip_grad_norm=null)")
        dist = torch.distributed
        sharded = any(_is_sharded(p) for g in self.param_groups for p in g["params"])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and self.process_group is None \
                and not sharded:
            # A DDP wrapper reduces gradients after these hooks have run: the updates would use one rank's.
            raise ValueError("layer-wise GaLore in a multi-process run reduces the gradients itself: pass "
                             "process_group (and do not wrap the model in DDP), or shard the model with FSDP2")
        # The memory runtime's HookSet (offload/hooks.py), or one of its own, installed now.
        self._hooks = hooks if hooks is not None else HookSet()
        for group in self.param_groups:
            for p in group["params"]:
                self._hooks.on_grad(p, "galore", self._on_grad)
        if hooks is None:
            self._hooks.install()

    def expect_backwards(self, micro_batches: int) -> None:
        self._micro, self._seen, self._low = micro_batches, {}, {}
        self._sq_norm = None

    @torch.no_grad()
    def _on_grad(self, p) -> None:
        seen = self._seen[p] = self._seen.get(p, 0) + 1
        last = seen >= self._micro
        if not self._group[p]["galore"]:
            if last:
                self._update(p, self._mean(p.grad))
                p.grad = None
            return
        if self.refresh_due(p) and self.options.projector != "random":
            if last:  # the basis comes from the whole step's (averaged) gradient, as without layer-wise
                self._update(p, self._projected(p, self._mean(p.grad)))
                p.grad = None
            return
        low = self._mean(self._projected(p, p.grad))  # linear: the mean of projections is the projected mean
        self._low[p] = low if p not in self._low else self._low[p].add_(low)
        p.grad = None
        if last:
            self._update(p, self._low.pop(p))

