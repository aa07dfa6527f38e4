"""The dry run: one step of a plan through the real runtime on meta (the GPU) and fake host tensors."""

import pytest

from longtune.trainer.config import load_config
from longtune.trainer.dry_run import draw_timeline, dry_run, rows_beside_plan
from longtune.trainer.capacities import load_machine, profile_capacities
from longtune.trainer.planning import plan_memory

# Llama-3-8B's config (Adam state on the host) at a small width and 4K tokens, a budget that makes the plan recompute.
SMALL = ["model.config.num_hidden_layers=2", "model.config.hidden_size=256", "model.config.intermediate_size=512",
         "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2", "model.config.vocab_size=1024",
         "data.seq_len=4096", "memory.budget_gb=0.06"]


@pytest.mark.parametrize("extra", [[], ["memory.params=cpu", "model.config.tie_word_embeddings=true"]],
                         ids=["weights-on-gpu", "weights-streamed-tied"])
def test_a_dry_run_allocates_what_the_plan_predicts(tmp_path, extra):
    cfg = load_config("llama3-8b-128k", SMALL + extra + [f"run.output_dir={tmp_path}"])
    machine = load_machine(cfg.memory.machine)
    plan = plan_memory(cfg, profile_capacities(cfg, machine, 1), machine, activations=True)
    places = {p for layer in plan.layers for d in layer.values() for p in d}
    assert "recompute" in places and plan.optimizer_tier == "cpu"  # the dry run carries out both

    run = dry_run(cfg, plan, timeline=True)

    pred = plan.predicted
    # The runtime's own count of saved activations on the device, and every byte the step allocated on each side
    assert run.activation_peak_bytes == pytest.approx(pred["activation_peak_bytes"], rel=0.01)
    assert run.peak_bytes["host"] == pytest.approx(pred["peak_bytes"]["host"], rel=0.1)
    # (a model this small spends most of its GPU rows on the planner's fixed margins: the plan is an upper bound;
    # the bundled configs' full-size dry runs are within 5%: README, bench/results/dry_run-*.json)
    assert run.peak_bytes["gpu"] <= pred["peak_bytes"]["gpu"]
    assert run.forward_ops < run.ops and run.samples[-1][0] <= run.ops
    # Row by row (the head, each layer's backward): the dry run never holds more than the plan's row says
    rows = rows_beside_plan(plan, run)
    assert [name for name, _, _ in rows] == ["head", "backward 1", "backward 0"]
    assert all(0 < measured <= planned for _, planned, measured in rows), rows
    picture = tmp_path / "timeline.png"
    draw_timeline(plan, run, str(picture), "small")
    assert picture.stat().st_size > 10_000


def test_a_dry_run_holds_the_optimizer_state_a_later_step_holds(tmp_path):
    """AdamW on the device makes its moments in its first step; the plan counts them in every row (a run's steps
    after the first hold them throughout), and so does the dry run's step. At 512 tokens the state is most of
    the head's row: the dry run's is the plan's to 1% (without the moments it would read 30% less)."""
    cfg = load_config("llama3-8b-128k", SMALL + ["memory.optimizer=gpu", "memory.budget_gb=0.2", "data.seq_len=512",
                                                 f"run.output_dir={tmp_path}"])
    machine = load_machine(cfg.memory.machine)
    plan = plan_memory(cfg, profile_capacities(cfg, machine, 1), machine, activations=True)
    assert plan.optimizer_tier == "gpu"
    rows = rows_beside_plan(plan, dry_run(cfg, plan, timeline=True))
    assert rows[0][0] == "head" and rows[0][2] == pytest.approx(rows[0][1], rel=0.01), rows
    assert all(measured <= planned for _, planned, measured in rows), rows
