"""parallel.strategy=deepspeed: DeepSpeed ZeRO stage 1-3, with its own optimizer and parameter offload.

The engine gets the model and the torch AdamW the memory runtime built (two groups: decay on matrices), and a
config generated from ours (batch, accumulation, clipping set explicitly: DeepSpeed's default clipping is 1.0,
PR #8068), or the user's JSON with those keys taken from our config. Checkpoints are DeepSpeed's own files
(every rank its partition) inside longtune's step_N folder; they are read with `weights_only=True` (DeepSpeed
itself unpickles everything) and cannot be resharded to another world size (ZeRO refuses; so do we, first).

On the CPU the collectives go through torch's gloo group: DeepSpeed's shared-memory all-reduce op would be
compiled with ninja on first use (~3 min), so it is switched off there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import ConfigError
from .deepspeed_files import weights_only_engine  # (it picks DeepSpeed's accelerator on a CPU machine)
from .strategy import Strategy


class DeepSpeed(Strategy):
    name = "deepspeed"

    def __init__(self, cfg, ranks, device):
        super().__init__(cfg, ranks, device)
        self.engine = None

    def wrap(self, model, runtime):
        super().wrap(model, runtime)
        import logging
        import warnings

        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)  # its per-step INFO lines on every rank drown the progress
        # ZeRO calls the collective under its old name; torch warns on every rank
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated\. Please use .*_single")
        if self.device.type == "cpu":
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build; gloo does the work
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=runtime.optimizer, config=self.ds_config())
        self.engine.checkpoint_engine = weights_only_engine(self.engine)
        return self.engine

    def ds_config(self) -> dict:
        t, p = self.cfg.train, self.cfg.parallel
        ours = {
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": t.grad_accum_steps,
            "train_batch_size": t.micro_batch_size * t.grad_accum_steps * self.ranks.world,
            "gradient_clipping": t.clip_grad_norm or 0.0,
        }
        if p.deepspeed_config:
            try:
                config = json.loads(Path(p.deepspeed_config).read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"parallel.deepspeed_config: {p.deepspeed_config} is unreadable: {e}") from None
            if not isinstance(config, dict):
                raise ConfigError(f"parallel.deepspeed_config: {p.deepspeed_config} is not a JSON object")
            changed = [f"{k} {config[k]} -> {v}" for k, v in ours.items() if k in config and config[k] != v]
            if changed:
                print(f"parallel.deepspeed_config: longtune's config sets {', '.join(changed)}")
            config = {**config, **ours}
        else:
            zero = {"stage": p.zero_stage}
            if p.offload_optimizer == "cpu":
                zero["offload_optimizer"] = {"device": "cpu"}
            if p.offload_params == "cpu":
                zero["offload_param"] = {"device": "cpu"}
            dtype = self.cfg.model.dtype
            config = {**ours, "zero_optimization": zero,
                      # train.mixed_precision=bf16 is autocast over the weights' dtype, as in the other strategies
                      "bf16": {"enabled": dtype == "bfloat16"}, "fp16": {"enabled": dtype == "float16"},
                      "steps_per_print": 10**9, "wall_clock_breakdown": False}
        # our torch AdamW (fused: its CPU kernel steps the offloaded shard) rather than DeepSpeed's compiled CPU Adam
        config["zero_force_ds_cpu_optimizer"] = False
        config["zero_allow_untested_optimizer"] = True
        return config

    def backward(self, loss: torch.Tensor) -> None:
        # the loss is already normalised over the step's global target count: no division by accumulation
        self.engine.backward(loss * self.ranks.world, scale_wrt_gas=False)
        self.engine.step()  # after every backward: DeepSpeed updates at the accumulation boundary only

    def clip_and_step(self):
        norm = self.engine.get_global_grad_norm()  # before clipping, as torch's clip_grad_norm_ returns it
        return torch.tensor(float(norm) if norm is not None else float("nan"))

    def zero_grad(self) -> None:
        pass  # the engine's step clears them

    def parts(self):
        return _DeepSpeedParts(self.engine, self.ranks.world)

    def check_resume(self, state: ckpt.TrainState, path) -> None:
        kind = ckpt.checkpoint_format(path)
        if kind != "deepspeed":
            raise ConfigError(f"checkpoint {path} was written by parallel.strategy={'fsdp2' if kind == 'dcp' else 'single or ddp'}; "
                              "DeepSpeed resumes its own checkpoints: resume with the strategy that wrote it, or start "
                              "from an export of it (model.path=EXPORT)")
        if state.world_size != self.ranks.world:
            raise ConfigError(f"checkpoint {path} was written by {state.world_size} DeepSpeed ZeRO ranks and this run "
                              f"has {self.ranks.world}: ZeRO cannot repartition its optimizer state; resume with "
                              f"{state.world_size} processes, or export it and start a new run from the export")

    def close(self) -> None:
        self.engine = None


class _DeepSpeedParts:
    format = "deepspeed"

    def __init__(self, engine, world: int):
        self.engine, self.world = engine, world

    def nbytes(self) -> int:
        # this rank's share: the weights (rank 0 writes them whole below ZeRO-3) and fp32 master + two moments
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        return int(n * 4 + n * 12 / self.world)

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder / ckpt.DEEPSPEED_DIR), tag=ckpt.DEEPSPEED_TAG)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder / ckpt.DEEPSPEED_DIR), tag=ckpt.DEEPSPEED_TAG,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ckpt.CheckpointError(f"checkpoint {folder} holds no DeepSpeed state under {ckpt.DEEPSPEED_DIR}/")
