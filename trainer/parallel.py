"""parallelize: how the ranks of a run share the work, between building the model and training it (torchtitan).

    strategy = build_strategy(cfg, ranks, device)     # single | ddp | fsdp2 | deepspeed
    strategy.shard(model)                             # FSDP2: fully_shard per decoder layer, before any optimizer
    runtime = build_runtime(...)                      # places the model, builds the optimizer (memory.py)
    train_model = strategy.wrap(model, runtime)       # the DDP wrapper or the DeepSpeed engine
    with strategy.micro_batch(last):                  # gradient sync on the step's last micro-batch only
        loss = train_model(...).loss
        strategy.backward(loss)
    grad_norm = strategy.clip_and_step()

The loss convention: each rank's loss is its own target tokens' summed loss over the global target count, so
the ranks' gradients sum to the gradient of the global mean. DDP, FSDP2 and DeepSpeed average over the ranks,
so backward scales the loss by the world size (exact for powers of two; otherwise to the dtype's rounding).
Checkpoints: `parts()` says how the strategy writes its weights and optimizer state (checkpoint.py).
The base class (the interface, and the single-process strategy) is in strategy.py, which DeepSpeed extends.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from longtune.models.layers import decoder_layers

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .layout import ParallelLayout
from .planning import activations_planned
from .ranks import Ranks
from .strategy import Strategy


class DDP(Strategy):
    """torch DistributedDataParallel; where the optimizer takes each gradient during backward (the offloaded
    optimizer, layer-wise GaLore) DDP would reduce too late, and the optimizer all-reduces each gradient in its
    own hook instead (RuntimeOptions.process_group)."""

    name = "ddp"

    def __init__(self, cfg, ranks, device):
        super().__init__(cfg, ranks, device)
        self.ddp = None

    def wrap(self, model, runtime):
        super().wrap(model, runtime)
        if runtime.reduces_gradients:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # bucket views: the gradients are the buckets, no second copy of them on the device
        self.ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                           gradient_as_bucket_view=True)
        return self.ddp

    def micro_batch(self, last: bool):
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()


class FSDP2(Strategy):
    """torch FSDP2: `fully_shard` on each decoder layer, then on the model (embeddings, final norm, LM head);
    optimizer state and gradients live as DTensor shards. Checkpoints are torch distributed checkpoints,
    resharded on load to any world size."""

    name = "fsdp2"

    def shard(self, model: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        p = self.cfg.parallel
        mesh = init_device_mesh(self.device.type, (self.ranks.world,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if p.fsdp_bf16 \
            else MixedPrecisionPolicy()
        kw = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=p.fsdp_reshard_after_forward)
        for layer in decoder_layers(model):
            fully_shard(layer, **kw)
        fully_shard(model, **kw)

    def micro_batch(self, last: bool):
        self.model.set_requires_gradient_sync(last)  # accumulate unsharded until the last micro-batch
        return contextlib.nullcontext()

    def clip_and_step(self):
        norm = self.runtime.clip_and_step()
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def parts(self):
        return _DcpParts(self.model, self.optimizer)

    def check_resume(self, state, path) -> None:
        kind = ckpt.checkpoint_format(path)
        if kind != "dcp":
            raise ConfigError(f"checkpoint {path} was written by parallel.strategy={'deepspeed' if kind == 'deepspeed' else 'single or ddp'}; "
                              "FSDP2 resumes its own (torch distributed) checkpoints: resume with the strategy that "
                              "wrote it, or start from an export of it (model.path=EXPORT)")


class _DcpParts:
    format = "dcp"

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def nbytes(self) -> int:
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
        total = sum(local(t).numel() * t.element_size() for t in self.model.state_dict().values())
        for state in self.optimizer.state.values():
            total += sum(local(v).numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
        return total

    def save(self, folder) -> None:
        ckpt.save_dcp(folder, self.model, self.optimizer)

    def load(self, folder) -> None:
        ckpt.load_dcp(folder, self.model, self.optimizer)


def build_strategy(cfg: Config, ranks: Ranks, device: torch.device) -> Strategy:
    layout = ParallelLayout.of(cfg, ranks.world, ranks.rank)
    name = layout.strategy
    if name == "deepspeed" and activations_planned(cfg) and layout.zero_stage >= 3:  # `longtune plan` shows it
        # ZeRO-3 gathers each Linear's weights in its own hooks and autograd Function; the layer runtime's
        # chunked graphs and gradient edges do not follow them (FSDP2 gathers per layer, and does).
        raise ConfigError("the activation runtime (memory.budget_gb / memory.plan) trains under DeepSpeed ZeRO "
                          "stage 1 and 2, not yet stage 3: use parallel.strategy=fsdp2 (sharded like ZeRO-3), "
                          "a lower parallel.zero_stage, or memory.gradient_checkpointing")
    if name == "single" and ranks.world > 1:
        raise ConfigError(f"parallel.strategy=single, but {ranks.world} processes were launched: set "
                          "parallel.strategy to ddp, fsdp2 or deepspeed (or auto), or launch one process")
    if name == "ddp" and ranks.world == 1:  # DDP would want a process group, and has nothing to reduce
        print("parallel.strategy=ddp in one process: training as one process (parallel.strategy=single, the same "
              "steps without a process group)")
        return Strategy(cfg, ranks, device)
    if name == "deepspeed":
        from .deepspeed_strategy import DeepSpeed

        return DeepSpeed(cfg, ranks, device)
    return {"single": Strategy, "ddp": DDP, "fsdp2": FSDP2}[name](cfg, ranks, device)
