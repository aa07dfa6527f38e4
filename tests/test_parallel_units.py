"""The pieces of multi-process training that need no second process: the data split, the per-rank planner
rows, the config's refusals, the launcher's command line."""

from __future__ import annotations

import pytest
import torch

from longtune.planner.problem import GaloreSizing, ModelShape, Sharding, state_options
from longtune.trainer.config import ConfigError, validate
from longtune.trainer.data import DataLoader, Sample
from longtune.trainer.capacities import load_machine
from longtune.trainer.layout import ParallelLayout


def sharding_of(cfg, world):
    return ParallelLayout.of(cfg, world).sharding


def strategy_of(cfg, world):
    return ParallelLayout.of(cfg, world).strategy


class _Numbers:
    """A source whose sample i is the number i."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        t = torch.tensor([i])
        return Sample(t, t, t)


def _ids(loader, steps):
    return [next(loader).input_ids.flatten().tolist() for _ in range(steps)]


def test_ranks_together_see_what_one_process_sees():
    one = _ids(DataLoader(_Numbers(), 2, seed=3), 12)  # 2 per micro-batch, across 2 epochs
    ranks = [_ids(DataLoader(_Numbers(), 1, seed=3, rank=r, world=2), 12) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(x) for x in one]
    assert all(a != b for a, b in zip(*ranks))
    # the position is global: the same on every rank, and valid for another world size
    loaders = [DataLoader(_Numbers(), 1, seed=3, rank=r, world=2) for r in range(2)]
    for loader in loaders:
        _ids(loader, 7)
    assert loaders[0].state_dict() == loaders[1].state_dict() == {"epoch": 1, "index": 4}
    single = DataLoader(_Numbers(), 2, seed=3)
    single.load_state_dict(loaders[0].state_dict())
    assert _ids(single, 1) == [one[7]]


def _shape():
    return ModelShape.from_hf_config({"model_type": "llama", "vocab_size": 1000, "hidden_size": 256,
                                      "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                                      "num_key_value_heads": 2}, "bfloat16")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_rank_is_planned_with_its_share_of_the_state(stage, tiny_config):
    shape, machine = _shape(), load_machine("h100-pcie5")
    full = state_options(shape, machine, 1e-3, "gpu", "gpu")[0].gpu_bytes
    cfg = validate({**tiny_config, "parallel": {"strategy": "deepspeed", "zero_stage": stage}})
    sharding = sharding_of(cfg, 4)
    assert sharding == Sharding(4, optimizer=True, grads=stage >= 2, weights=stage >= 3)
    rank = state_options(shape, machine, 1e-3, "gpu", "gpu", sharding=sharding)[0].gpu_bytes
    layer = shape.layer_params * 2
    assert rank["optimizer"] == full["optimizer"] / 4
    assert rank["grads"] == (full["grads"] / 4 + layer if stage >= 2 else full["grads"])
    assert rank["weights"] == (full["weights"] / 4 + 2 * layer if stage == 3 else full["weights"])
    ddp = validate(tiny_config)
    assert strategy_of(ddp, 1) == "single" and strategy_of(ddp, 4) == "ddp" and sharding_of(ddp, 4) == Sharding(4)
    assert state_options(shape, machine, 1e-3, "gpu", "gpu", sharding=Sharding(4))[0].gpu_bytes == full
    fsdp = validate({**tiny_config, "parallel": {"strategy": "fsdp2"}})
    assert sharding_of(fsdp, 4) == Sharding(4, optimizer=True, grads=True, weights=True)
    assert GaloreSizing  # (GaLore's rows are per rank already: it runs under DDP only)


@pytest.mark.parametrize("section, message", [
    ({"parallel": {"zero_stage": 3}}, "parallel.zero_stage is a DeepSpeed setting but parallel.strategy=auto"),
    ({"parallel": {"strategy": "ddp", "fsdp_bf16": True}}, "parallel.fsdp_* are FSDP2 settings"),
    ({"parallel": {"strategy": "deepspeed", "offload_params": "cpu"}}, "parallel.offload_params needs ZeRO stage 3"),
    ({"parallel": {"strategy": "fsdp2"}, "memory": {"optimizer": "cpu"}}, "FSDP2 owns the optimizer state"),
    ({"parallel": {"strategy": "deepspeed"}, "memory": {"params": "cpu", "optimizer": "cpu"}},
     "parallel.offload_optimizer / parallel.offload_params (ZeRO-Offload)"),
    ({"parallel": {"strategy": "fsdp2"}, "optim": {"name": "galore_adamw"}}, "FSDP2 steps its own AdamW"),
    ({"parallel": {"stratgy": "ddp"}}, "did you mean parallel.strategy"),
    ({"launch": {"backend": "slurm"}}, "launch.backend"),
    ({"launch": {"ray": {"num_workers": 0}}}, "launch.ray.num_workers"),
])
def test_parallel_settings_that_do_not_fit_are_refused(section, message, tiny_config):
    cfg = dict(tiny_config)
    for key, value in section.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        validate(cfg)


def test_launch_flags_go_to_torchrun_and_the_ranks_get_the_rest():
    from longtune.launch.cli import _flags_first, build_parser

    argv = ["train", "cfg.yaml", "train.lr=1e-3", "--nproc", "2", "--max-restarts=1", "--print-config"]
    args = build_parser().parse_args(_flags_first(argv))
    assert (args.config, args.overrides, args.nproc, args.max_restarts, args.print_config) == \
        ("cfg.yaml", ["train.lr=1e-3"], 2, 1, True)
    plan = build_parser().parse_args(_flags_first(["plan", "cfg.yaml", "parallel.strategy=fsdp2", "--nproc", "8"]))
    assert (plan.nproc, plan.overrides) == (8, ["parallel.strategy=fsdp2"])


def test_a_multi_process_launch_without_a_strategy_for_it_is_refused(tiny_config):
    from longtune.trainer.parallel import build_strategy
    from longtune.trainer.ranks import Ranks

    cfg = validate({**tiny_config, "parallel": {"strategy": "single"}})
    with pytest.raises(ConfigError, match="parallel.strategy=single, but 2 processes were launched"):
        build_strategy(cfg, Ranks(0, 2), torch.device("cpu"))
    planned = validate({**tiny_config, "parallel": {"strategy": "deepspeed", "zero_stage": 3}, "memory": {"budget_gb": 10}})
    with pytest.raises(ConfigError, match="under DeepSpeed ZeRO stage 1 and 2, not yet stage 3: use parallel.strategy=fsdp2"):
        build_strategy(planned, Ranks(0, 2), torch.device("cpu"))


def test_the_zero_stage_of_a_users_deepspeed_json_sizes_the_plan(tiny_config, tmp_path):
    from longtune.trainer.parallel import build_strategy
    from longtune.trainer.ranks import Ranks

    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    cfg = validate({**tiny_config, "parallel": {"strategy": "deepspeed", "deepspeed_config": str(ds)}})
    assert sharding_of(cfg, 4).weights  # stage 3 from the JSON, not parallel.zero_stage's default 2
    with pytest.raises(ConfigError, match="not yet stage 3"):
        build_strategy(validate({**cfg.model_dump(), "memory": {"budget_gb": 10}}), Ranks(0, 2), torch.device("cpu"))
    ds.write_text('{"zero_optimization": {"stage": "three"}}')
    with pytest.raises(ConfigError, match="zero_optimization.stage='three'; ZeRO stages are 0-3"):
        sharding_of(cfg, 4)
    ds.write_text('{"zero_optimization": {}}')  # DeepSpeed's default: no ZeRO, nothing sharded
    assert sharding_of(cfg, 4) == sharding_of(validate({**tiny_config, "parallel": {"strategy": "ddp"}}), 4)


def test_a_missing_deepspeed_json_is_refused_before_anything_loads(tiny_config, tmp_path):
    from longtune.trainer.inputs import check

    cfg = validate({**tiny_config, "parallel": {"strategy": "deepspeed", "deepspeed_config": str(tmp_path / "ds.json")}})
    with pytest.raises(ConfigError, match="parallel.deepspeed_config: .*ds.json is not a file"):
        check(cfg)
    assert not (tmp_path / "run").exists()


def test_more_ranks_than_gpus_are_refused_in_one_line(tiny_config, tmp_path):
    """rank r takes cuda:LOCAL_RANK: with fewer GPUs than ranks on a machine, rank 1 would die at start-up.
    `longtune train --nproc` refuses before any rank starts (tests/test_gpu.py on a real GPU machine), a rank
    another launcher started refuses at its start, and run.device=cpu runs the ranks on the CPU instead."""
    from conftest import run_cli, write_yaml

    from longtune.trainer.ranks import device_type, gpus_short

    assert gpus_short(1, 1) == gpus_short(8, 8) == ""
    assert gpus_short(2, 1) == ("2 processes on this machine take a GPU each (cuda:LOCAL_RANK) and it has 1: run 1 "
                                "process(es) per machine, or run.device=cpu for processes on the CPU (gloo)")
    assert device_type("cpu") == "cpu"
    if torch.cuda.is_available():
        return
    assert device_type("auto") == "cpu"
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config)
    result = run_cli("train", cfg, "--nproc", "2", "run.device=cuda")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: run.device=cuda, but torch sees no GPU (a CPU build of "
                                                  "torch, or no visible device)"]


def test_the_longest_context_is_searched_with_the_state_placed_by_the_solver_too():
    """`longtune plan --longest`: the config's placement (optimizer on the host, weights on the GPU), the solver's
    (auto, auto), and that with prefetch depth 0 (one layer's staging/prefetch buffers); each says where the state
    went, what its plan presses on, and why one step more fails."""
    from longtune.trainer.config import load_config
    from conftest import REPO

    from longtune.trainer.longest import SEARCH_STEP_TOKENS, longest_over_placements

    cfg = load_config(str(REPO / "configs" / "llama3-8b-128k.yaml"), [])
    own, auto, shallow = longest_over_placements(cfg, load_machine(cfg.memory.machine), 1)
    assert own.placement == "memory.optimizer=cpu memory.params=gpu" and own.plan.params_tier == "gpu"
    assert auto.placement == "memory.optimizer=auto memory.params=auto"
    assert shallow.placement == "memory.optimizer=auto memory.params=auto memory.prefetch_depth=0"
    assert shallow.plan.problem.prefetch_depth == 0
    # moving the weights too buys context, and holding one layer's buffers instead of two more (predicted)
    assert shallow.seq_len > auto.seq_len > own.seq_len > 131072
    for found in (own, auto, shallow):
        assert found.seq_len % SEARCH_STEP_TOKENS == 0 and found.plan.problem.meta["tokens"] == found.seq_len
        assert any("GPU budget" in b for b in found.plan.binding)
        assert found.next_failure.startswith("no plan fits a GPU budget of 70.00 GB")
