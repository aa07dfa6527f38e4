"""The training loop: config -> model, data, optimizer -> steps, metrics, checkpoints."""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from longtune.planner.plan import PlanInfeasible

from . import checkpoint as ckpt
from .config import Config, ConfigError, dump_config
from .errors import RunError, Stopped, defer_stop, full_disk_hint, stop_requested
from .data import DataLoader, PasskeyTask, build_source, passkey_accuracy
from .inputs import (RunLock, check, check_same_optimizer, data_change_refusal, remove_stale_temporaries,
                     resolve_resume, write_atomic)
from .capacities import live_capacities
from .memory import baseline_bytes, build_runtime
from .planning import infeasible_error, plan_memory
from .metrics import MetricsLogger, gpu_memory_gb, host_memory_gb, peak_flops, reset_gpu_peak, train_flops_per_token
from .adapters import apply_adapter, export_adapter, merge_adapter
from .model import build_model, build_tokenizer, count_parameters, patch_model
from .parallel import build_strategy
from .strategy import Strategy
from .ranks import Ranks, device_type
from .sequence_parallel import SequenceParallel


TOKENIZER_DIR = "tokenizer"  # the run's own copy: resume and export need no GGUF parse


@dataclass
class RunResult:
    output_dir: Path
    step: int
    last_loss: Optional[float]
    eval: dict[str, float]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    from transformers import get_scheduler

    t = cfg.train
    name, extra = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.schedule], {}
    if t.schedule == "cosine" and t.min_lr_ratio > 0:
        name, extra = "cosine_with_min_lr", {"min_lr_rate": t.min_lr_ratio}
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps, scheduler_specific_kwargs=extra)


def pick_device(ranks: Ranks = Ranks(), want: str = "auto") -> torch.device:
    """This rank's device (run.device): cuda:LOCAL_RANK, or the CPU."""
    try:
        kind = device_type(want)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return torch.device("cuda", ranks.local_rank) if kind == "cuda" else torch.device("cpu")


def forward_backward(model: torch.nn.Module, batches: list, device: torch.device, autocast,
                     strategy: Optional[Strategy] = None, ranks: Ranks = Ranks()) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step; returns the step's mean loss per target token, over
    every rank's micro-batches."""
    # Normalise by the label count of the whole step on every rank, so accumulation and data parallelism equal
    # one big batch.
    n_targets = max(ranks.sum_int(sum(b.loss_tokens for b in batches)), 1)
    loss = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        shifted = {} if batch.shift_labels is None else {"shift_labels": batch.shift_labels}
        with (strategy.micro_batch(last=i == len(batches) - 1) if strategy else contextlib.nullcontext()), autocast():
            out = model(
                input_ids=batch.input_ids,
                position_ids=batch.position_ids,
                labels=batch.labels,
                num_items_in_batch=n_targets,
                use_cache=False,  # a cache disables the packed-document mask
                **shifted,
            )
            strategy.backward(out.loss) if strategy else out.loss.backward()
        loss += out.loss.detach()
    return ranks.sum(loss)


def train(cfg: Config, on_checkpoint=None) -> RunResult:
    """Train on this process, one rank of the process group when there is one (launch/distributed.py).

    on_checkpoint(path, step, metrics), when given, runs on every rank after each complete checkpoint (the Ray
    launcher reports it to Ray Train there)."""
    ranks = Ranks.current()
    output_dir = check(cfg)
    lock = RunLock(output_dir)  # one run per run folder: a second refuses, naming the first (rank 0 holds it)
    notice = lock.acquire() if ranks.main else None
    if notice:
        print(notice)
    try:
        if ranks.main:
            removed, freed = remove_stale_temporaries(output_dir)
            if removed:
                print(f"removed {removed} temporary checkpoint file(s) or folder(s) ({freed / 1e9:.2f} GB) left by "
                      "interrupted runs")
        ranks.barrier()
        return _train_in(cfg, output_dir, ranks, on_checkpoint)
    finally:
        if ranks.main:
            lock.release()


def _train_in(cfg: Config, output_dir: Path, ranks: Ranks, on_checkpoint) -> RunResult:
    # rank 0 decides which checkpoint every rank starts from (they could see the folder at different moments)
    resume_from = ranks.from_main(resolve_resume(cfg, output_dir) if ranks.main else None)
    if resume_from is not None:
        check_same_optimizer(cfg, resume_from)
        refused = data_change_refusal(_saved_config(resume_from), cfg, output_dir,
                                      f"checkpoint {resume_from} was written with")
        if refused:
            raise ConfigError(refused)
    device = pick_device(ranks, cfg.run.device)
    try:  # before the model is built: a plan that cannot fit stops here, in seconds
        plan = plan_memory(cfg, live_capacities(cfg, device), world=ranks.world)
    except PlanInfeasible as e:
        raise infeasible_error(e) from None
    strategy = build_strategy(cfg, ranks, device)
    seed_everything(cfg.train.seed)
    config_yaml = dump_config(cfg)
    # A resumed run reads its own copy of the tokenizer (no GGUF parse); a new run writes it (see write_run_files).
    tokenizer = build_tokenizer(cfg.model, saved=output_dir / TOKENIZER_DIR if resume_from else None)
    train_source = build_source(cfg.data, tokenizer, cfg.train.seed)  # before the model: a bad record stops in seconds
    model = build_base_model(cfg, resume_from)  # on the host: the runtime places it
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:  # a token id past the embedding would fail deep in the first forward
        raise ConfigError(f"the tokenizer has {len(tokenizer):,} tokens but the model's vocab_size is {vocab:,}: set "
                          f"model.config.vocab_size to at least {len(tokenizer)}, or use the model's own tokenizer")
    n_params = count_parameters(model)  # before streamed weights leave the model
    patch_model(model, cfg)
    sp = SequenceParallel.build(cfg, ranks)
    sp.apply(model)  # sequence parallel: attention over the group's shards of each sequence
    strategy.shard(model)  # FSDP2 shards the weights before the optimizer is built over them
    eval_task = None
    if isinstance(train_source, PasskeyTask) and cfg.data.passkey.eval_samples:
        eval_task = PasskeyTask(tokenizer, cfg.data.seq_len, cfg.data.passkey.digits, cfg.train.seed, split="eval")
    loader = DataLoader(train_source, cfg.train.micro_batch_size, cfg.train.seed, sp.dp_rank, sp.dp_world)
    runtime = build_runtime(cfg, model, plan, device, ranks.world, sequence=sp.group)
    train_model = strategy.wrap(model, runtime)

    def write_run_files() -> None:
        """The run folder changes only once the model, the data and any checkpoint have loaded: a start that
        fails leaves it as it was (a resume with a bad override does not rewrite the run's config)."""
        if not ranks.main:
            return
        write_atomic(output_dir / "config.resolved.yaml", config_yaml)
        if resume_from is None:
            _save_run_tokenizer(tokenizer, output_dir / TOKENIZER_DIR)
        if plan.problem.offload_activations:  # decided once, by plan_memory
            write_atomic(output_dir / "plan.yaml", plan.to_yaml())
            print(f"plan written to {output_dir / 'plan.yaml'}")

    if plan.problem.offload_activations:
        print(describe_plan(plan))
    for note in runtime.notes:
        print(note)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if ranks.world > 1:
        split = f", {sp.dp_world} x sequence parallel {sp.size}" if sp.size > 1 else ""
        print(f"{ranks.world} processes, parallel.strategy={strategy.name}{split}; each rank's plan is solved for its own "
              "share of the state")
    try:
        return _train(cfg, output_dir, resume_from, device, train_model, n_params, runtime, loader, eval_task,
                      config_yaml, write_run_files, strategy, ranks, on_checkpoint, sp)
    finally:
        try:
            strategy.close()
        finally:
            runtime.close()


def describe_plan(plan) -> str:
    from longtune.planner.report import format_plan

    return format_plan(plan)


def _train(cfg, output_dir, resume_from, device, train_model, n_params, runtime, loader, eval_task, config_yaml,
           write_run_files, strategy: Strategy, ranks: Ranks, on_checkpoint, sp: SequenceParallel) -> RunResult:
    model = strategy.model  # the model itself (train_model may be its DDP wrapper or DeepSpeed engine)
    optimizer = strategy.optimizer
    scheduler = build_scheduler(optimizer, cfg)

    state = ckpt.TrainState()
    if resume_from is not None:
        strategy.check_resume(ckpt.read_train_state(resume_from / "trainer_state.json"), resume_from)
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, parts=strategy.parts(), rank=ranks.rank)
        note = global_batch_note(_saved_config(resume_from), cfg, state.world_size, ranks.world)
        if note and ranks.main:  # (a warning would print on every rank)
            print(f"warning: {note}", file=sys.stderr)
        elif state.world_size != ranks.world:
            print(f"resuming a run of {state.world_size} process(es) on {ranks.world}: the data order goes on from the "
                  f"same global position")
        loader.load_state_dict(state.data)
        _reapply_schedule(scheduler)
        print(f"resumed from {resume_from} at step {state.step} ({state.tokens_seen:,} tokens seen)")
        if state.step >= cfg.train.max_steps:
            print(f"nothing to train: the run is at step {state.step} and train.max_steps={cfg.train.max_steps} "
                  f"(to go on: longtune resume {output_dir} train.max_steps=N)")
    write_run_files()

    t = cfg.train
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if t.mixed_precision == "bf16" else contextlib.nullcontext
    mc = model.config
    flops_per_token = train_flops_per_token(n_params, mc.num_hidden_layers, mc.hidden_size, cfg.data.seq_len)
    peak = peak_flops(device)
    peak = peak * ranks.world if peak else peak  # the step's tokens are every rank's: so is the peak
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * cfg.data.seq_len * ranks.world // sp.size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapters = f" ({trainable / 1e6:.2f}M in {cfg.adapter.kind} adapters train)" if cfg.adapter.kind != "none" else ""
    print(
        f"model {n_params / 1e6:.1f}M params{adapters} on {device} | {cfg.data.kind} data, {cfg.data.seq_len:,} tokens/seq, "
        f"{tokens_per_step:,} tokens/step | steps {state.step + 1}..{t.max_steps} | run folder {output_dir}"
    )
    logger = MetricsLogger(output_dir, cfg.log.sinks, t.max_steps, state.step) if ranks.main else _NoLogger()
    last_loss, eval_metrics, saved_step = None, {}, state.step

    def save(state: ckpt.TrainState, metrics: dict) -> None:
        path = ckpt.save_checkpoint(output_dir, state, model, optimizer, scheduler, config_yaml,
                                    cfg.checkpoint.keep_last, parts=strategy.parts(), ranks=ranks)
        if on_checkpoint is not None:
            on_checkpoint(path, state.step, metrics)

    def evaluate() -> dict[str, float]:
        if eval_task is None:
            return {}
        metrics = passkey_accuracy(model, eval_task, cfg.data.passkey.eval_samples, device, autocast)
        logger.log(state.step, metrics)
        reset_gpu_peak(device)
        return metrics

    def stop_if_asked() -> None:
        """SIGTERM (a scheduler's): at a step boundary, every rank together, after saving a checkpoint."""
        if ranks.all_ok(not stop_requested()):  # (one process: no collective)
            return
        saving = cfg.checkpoint.every_n_steps or cfg.checkpoint.save_final
        if saving and saved_step != state.step and state.step > 0:
            save(state, {"loss": last_loss, "step": state.step})
        where = f"after step {state.step}" if state.step else "before the first step"
        if saving and state.step > 0:
            saved = f"checkpoint {ckpt.step_dir(output_dir, state.step)} saved; continue with: longtune resume {output_dir}"
        elif state.step > 0:
            saved = "no checkpoint saved (checkpoint.every_n_steps=0 and checkpoint.save_final=false)"
        else:
            saved = "nothing trained"
        raise Stopped(f"stopped by SIGTERM {where}: {saved}")

    traffic_seen = runtime.traffic()
    try:
        defer_stop()  # SIGTERM from here on waits for a step boundary
        if state.step == 0:
            evaluate()  # the starting point, so the run shows what training changed
        stop_if_asked()
        # the process's memory outside the plan, before its first step (on the first logged step's line)
        outside, how = baseline_bytes(model)
        baseline = {"mem_baseline_gb": outside / 1e9, "mem_baseline_source": how}
        for step in range(state.step + 1, t.max_steps + 1):
            start = time.perf_counter()
            batches = [sp.shard(next(loader)) for _ in range(t.grad_accum_steps)]
            with runtime.step(len(batches)):
                loss = forward_backward(train_model, batches, device, autocast, strategy, ranks)
            lr = scheduler.get_last_lr()[0]
            grad_norm = strategy.clip_and_step()  # an offloaded optimizer's layer updates may still be running
            scheduler.step()
            strategy.zero_grad()
            state.step, state.tokens_seen, state.data = step, state.tokens_seen + tokens_per_step, loader.state_dict()
            last_loss = float(loss)
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"loss is {last_loss} at step {step}; lower train.lr or check the data")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            moved = runtime.traffic()
            # this step's share, since the last snapshot: what lands between steps (an update finishing) counts too
            share, traffic_seen = {k: v - traffic_seen.get(k, 0.0) for k, v in moved.items()}, moved
            logger.advance()
            if step % cfg.log.every_n_steps == 0 or step == t.max_steps:
                logger.log(step, {
                    "loss": last_loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_seen": state.tokens_seen,
                    "tokens_per_s": tokens_per_step / elapsed,
                    "step_time_s": elapsed,
                    "tflops": flops_per_token * tokens_per_step / elapsed / 1e12,
                    "mfu": flops_per_token * tokens_per_step / elapsed / peak if peak else None,
                    **gpu_memory_gb(device),
                    **host_memory_gb(),
                    **share,
                    **runtime.memory_metrics(),
                    **baseline,
                })
                baseline = {}
                reset_gpu_peak(device)  # the next line's peak is that step's
            if cfg.checkpoint.every_n_steps and step % cfg.checkpoint.every_n_steps == 0:
                save(state, {"loss": last_loss, "step": step})
                saved_step = step
            stop_if_asked()
            if t.eval_every_n_steps and step % t.eval_every_n_steps == 0 and step != t.max_steps:
                evaluate()
        if cfg.checkpoint.save_final and saved_step != state.step:
            save(state, {"loss": last_loss, "step": state.step})
            saved_step = state.step
        stop_if_asked()
        eval_metrics = evaluate()
    finally:
        logger.close()
    return RunResult(output_dir, state.step, last_loss, eval_metrics)


def _save_run_tokenizer(tokenizer, folder: Path) -> None:
    """The run's copy of its tokenizer; a save that fails (a full disk: an OSError from transformers, an
    '(os error 28)' from the Rust tokenizers) is one line naming the folder, and leaves no half of it."""
    try:
        tokenizer.save_pretrained(folder)
    except Exception as e:  # noqa: BLE001 -- whatever the library raises, the folder could not be written
        shutil.rmtree(folder, ignore_errors=True)
        text = str(e).strip()
        cause = getattr(e, "strerror", None) or (text.splitlines()[0] if text else type(e).__name__)
        raise RunError(f"could not write the run's tokenizer copy {folder}: {cause}{full_disk_hint(e)}") from None


def _saved_config(checkpoint: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load((checkpoint / "config.resolved.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def global_batch_note(saved: dict, cfg: Config, was_world: int, world: int) -> Optional[str]:
    """A line when a resumed run's global batch (tokens per optimizer step) is not its checkpoint's: fewer ranks
    without more accumulation would change it silently. `saved`: the checkpoint's config."""
    def section(name):
        return saved.get(name) if isinstance(saved.get(name), dict) else {}

    was_train, was_sp = section("train"), section("parallel").get("sequence_parallel", 1)
    was_accum, was_micro = was_train.get("grad_accum_steps", 1), was_train.get("micro_batch_size", 1)
    was_seq = section("data").get("seq_len")
    if not all(isinstance(v, int) and v > 0 for v in (was_accum, was_micro, was_seq, was_sp, was_world)):
        return None
    t, sp = cfg.train, cfg.parallel.sequence_parallel
    was = was_micro * was_accum * was_seq * was_world // was_sp
    now = t.micro_batch_size * t.grad_accum_steps * cfg.data.seq_len * world // sp
    if was == now:
        return None
    ranks = f"resuming a run of {was_world} process(es) on {world}: " if was_world != world else ""
    per_micro_batch = now // t.grad_accum_steps  # one micro-batch on every data-parallel rank
    keep = (f"to keep it, resume with train.grad_accum_steps={was // per_micro_batch}" if was % per_micro_batch == 0
            else f"no whole train.grad_accum_steps keeps it on {world} process(es)")
    return (f"{ranks}the global batch changes from {was:,} to {now:,} tokens per step ({keep}); the data order goes on "
            "from the same global position")


def _reapply_schedule(scheduler) -> None:
    """The learning rate of the step a resumed run is at, from the schedule as configured now: the optimizer's
    saved rate is the last step's of the old schedule, and a run extended (train.max_steps raised) after it
    finished would take its next step at the old schedule's end value (0 for cosine). Unchanged, it is the same."""
    lrs = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


class _NoLogger:
    """Ranks other than 0 write no metrics (the loss and the step are the same on every rank)."""

    def log(self, step, values) -> None:
        pass

    def advance(self) -> None:
        pass

    def close(self) -> None:
        pass


def build_base_model(cfg: Config, checkpoint: Optional[Path]) -> torch.nn.Module:
    """The model a run trains, before its checkpoint (if any) loads into it: built from the checkpoint's architecture
    alone (every weight is in the checkpoint), or, with adapters, from model.* (the frozen base is not in it) with the
    adapters injected."""
    if cfg.adapter.kind == "none":
        return build_model(cfg.model, checkpoint=checkpoint)
    model = build_model(cfg.model)
    apply_adapter(model, cfg.adapter)
    return model


def load_trained(run_dir: Path, step: Optional[int] = None):
    """(config, model, tokenizer, checkpoint path) of a run's newest complete (or given) checkpoint."""
    from .config import read_yaml, validate

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ckpt.CheckpointError(f"run folder {run_dir} does not exist")
    complete = [s for s, p in ckpt.list_checkpoints(run_dir) if ckpt.is_complete(p)]
    if not complete:
        raise ckpt.CheckpointError(f"{run_dir} holds no complete checkpoint")
    if step is not None and step not in complete:
        raise ckpt.CheckpointError(f"{run_dir} has no complete step_{step}; complete checkpoints: {complete}")
    path = ckpt.step_dir(run_dir, complete[-1] if step is None else step)
    if not (path / "config.resolved.yaml").is_file():
        raise ckpt.CheckpointError(f"checkpoint {path} has no config.resolved.yaml")
    cfg = validate(read_yaml(path / "config.resolved.yaml"))
    model = build_base_model(cfg, path)
    ckpt.load_checkpoint(path, model, restore_rng=False)
    return cfg, model, build_tokenizer(cfg.model, saved=run_dir / TOKENIZER_DIR), path


def export(run_dir: Path, out_dir: Path, step: Optional[int] = None, merge: bool = False) -> Path:
    """A transformers save_pretrained folder (weights, config, tokenizer), written beside --out and moved into place
    when complete, so a failed export leaves nothing that looks like a model. A run with adapters exports a peft
    adapter folder (PeftModel.from_pretrained loads it over the base model), or with `merge` the merged model."""
    import os
    import shutil

    cfg, model, tokenizer, path = load_trained(run_dir, step)
    out_dir = Path(out_dir)
    model.config.use_cache = True  # for generation with the exported model
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    adapters = cfg.adapter.kind != "none"
    if merge and not adapters:
        raise ConfigError(f"export --merge merges LoRA adapters into their base model; {run_dir} was trained without "
                          "adapters (adapter.kind=none): export it without --merge")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        if adapters and not merge:
            tmp.mkdir(parents=True)
            export_adapter(model, cfg.adapter, cfg.model.path or "", tmp)
        else:
            if adapters:
                merge_adapter(model)
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    except OSError as e:
        raise ckpt.CheckpointError(f"could not export to {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
