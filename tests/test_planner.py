"""The schedule MILP against brute force, its limits, monotonicity, and `longtune plan`."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
from conftest import cli_env, run_cli, write_yaml

from longtune.planner.evaluate import GPU, RECOMPUTE, evaluate, margin_bytes, places
from longtune.planner.milp import min_gpu_budget, solve_schedule
from longtune.planner.plan import Plan, PlanInfeasible, fallback_decisions, make_plan
from longtune.planner.problem import CLASSES, Machine, ModelShape, Tier, build_problem
from longtune.planner.report import format_plan

LLAMA_8B = dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)


def small_problem(layers: int, chunks: int, tiers=("host",), link_gbps: float = 2.0, loss_chunk_tokens: int = 4096,
                  optimizer: str = "cpu", accumulation: int = 1):
    """A few 8B-sized layers at 32K tokens on a machine with a slow link, so every
    kind of decision (keep, offload, recompute, exposed transfer) can be optimal."""
    shape = ModelShape.from_hf_config({**LLAMA_8B, "num_hidden_layers": layers}, "bfloat16")
    machine = Machine("test", 80e9, 989e12, 0.6, 0.5, tuple(
        Tier(name, 200e9 if name == "host" else 1e12, link_gbps * 1e9 * (1 if name == "host" else 0.5),
             link_gbps * 1e9 * (1 if name == "host" else 0.5))
        for name in tiers
    ))
    return build_problem(shape, 32768, machine, chunks=chunks, optimizer=optimizer, loss_chunk_tokens=loss_chunk_tokens,
                         accumulation=accumulation)


def all_decisions(problem):
    """Every decision set, by brute force."""
    G, options = problem.chunks, []
    for c in CLASSES:
        allowed = [p for p in places(problem) if p != RECOMPUTE or c in problem.recompute_s]
        if c in problem.all_or_nothing:
            options.append([{p: G} for p in allowed])
        else:
            options.append([
                {p: n for p, n in zip(allowed, counts) if n}
                for counts in itertools.product(range(G + 1), repeat=len(allowed)) if sum(counts) == G
            ])
    per_layer = [dict(zip(CLASSES, combo)) for combo in itertools.product(*options)]
    return itertools.product(per_layer, repeat=problem.num_layers)


def keep_all_peak(problem) -> float:
    return evaluate(problem, [{c: {GPU: problem.chunks} for c in CLASSES}] * problem.num_layers).gpu_peak_bytes


@pytest.mark.parametrize("layers, chunks, tiers", [(3, 1, ("host",)), (2, 2, ("host",)), (2, 1, ("host", "nvme"))])
def test_milp_matches_brute_force(layers, chunks, tiers):
    base = small_problem(layers, chunks, tiers)
    low, high = min_gpu_budget(base, gap=0), keep_all_peak(base)
    candidates = [list(d) for d in all_decisions(base)]
    evaluated = [(evaluate(base, d), d) for d in candidates]
    for budget in [low, low + 0.2 * (high - low), low + 0.5 * (high - low), low + 0.8 * (high - low), high]:
        problem = base.with_budget(budget * (1 + 1e-9))
        # The MILP keeps a margin under the budget (solver tolerances): brute force gets the same rule.
        limit = problem.budget_bytes - margin_bytes(problem.budget_bytes)
        best = min(ev.objective for ev, _ in evaluated if ev.gpu_peak_bytes <= limit)
        solution = solve_schedule(problem, gap=0)
        assert solution.status == "optimal"
        assert evaluate(problem, solution.decisions).objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    with pytest.raises(PlanInfeasible):
        make_plan(base.with_budget(low * 0.99), with_arena=False)


@pytest.mark.parametrize("overlap", [True, False])
def test_milp_objective_is_what_evaluate_predicts(overlap):
    """Also where transfers cannot hide behind compute (the CPU as the device: Machine.overlaps_transfers false):
    then every second of link time is in the step."""
    from dataclasses import replace

    problem = replace(small_problem(6, 4, ("host", "nvme")), overlap=overlap).with_budget(0)
    problem = problem.with_budget(min_gpu_budget(problem) * 1.3)
    solution = solve_schedule(problem, gap=0)
    ev = evaluate(problem, solution.decisions)
    assert ev.feasible
    assert solution.objective == pytest.approx(ev.objective, rel=1e-9)
    if not overlap:  # every activation to the host: all of its link time is in the step
        to_host = [{c: {"host": problem.chunks} for c in CLASSES} for _ in range(problem.num_layers)]
        moved = evaluate(problem, to_host)
        assert moved.exposed_transfer_s == pytest.approx(moved.link_s, rel=1e-9) and moved.link_s > 0


def test_step_time_never_increases_with_the_budget():
    base = small_problem(6, 4, ("host", "nvme"))
    low, high = min_gpu_budget(base, gap=0), keep_all_peak(base)
    times = []
    for i in range(13):
        budget = low + (high - low) * i / 12
        times.append(make_plan(base.with_budget(budget * (1 + 1e-9)), gap=0, with_arena=False).predicted["step_time_s"])
    assert all(b <= a + 1e-12 for a, b in zip(times, times[1:])), times
    assert times[0] > times[-1], "the sweep must span a real trade-off"


def test_tiny_budget_recomputes_everything():
    """At the smallest budget, when the backward rows bind (a small loss chunk keeps the LM head
    row below them), every byte that can be recomputed is, and the layer input and attention
    output leave the GPU, except in the last two layers: an offloaded layer occupies the rows of
    its own backward and the next one's, so there keeping costs no more and saves the copies
    (MEMO's rule "the last 2 layers are never swapped", found by the solver). The optimizer is on the GPU and
    the step accumulates 2 micro-batches, so its state is the same in every row (off it, or with one micro-batch,
    the gradients alive differ by row: timeline.state_rows, timeline.device_state_rows)."""
    base = small_problem(6, 4, ("host",), link_gbps=50, loss_chunk_tokens=128, optimizer="gpu", accumulation=2)
    plan = make_plan(base.with_budget(min_gpu_budget(base, gap=0) * (1 + 1e-6)), gap=0, with_arena=False)
    for l, layer in enumerate(plan.layers):
        assert layer["pre"] == {RECOMPUTE: 4} and layer["post"] == {RECOMPUTE: 4}
        if l < len(plan.layers) - 2:
            assert layer["input"] == {"host": 4} and layer["attn"] == {"host": 4}


def test_huge_budget_keeps_everything():
    base = small_problem(4, 4, ("host", "nvme"))
    plan = make_plan(base.with_budget(keep_all_peak(base) * 2), with_arena=False)
    assert all(layer[c] == {GPU: 4} for layer in plan.layers for c in CLASSES)
    assert plan.predicted["recompute_s"] == 0 and plan.predicted["exposed_transfer_s"] == 0
    assert plan.binding == []


def test_infeasible_budget_says_how_much_is_missing():
    base = small_problem(4, 4)
    low = min_gpu_budget(base, gap=0)
    with pytest.raises(PlanInfeasible) as info:
        make_plan(base.with_budget(low - 3e9), with_arena=False)
    assert info.value.missing_bytes == pytest.approx(3e9, rel=1e-6)
    assert "3.00 GB missing" in str(info.value)


def test_fallback_when_the_solver_is_unavailable():
    base = small_problem(4, 4)
    problem = base.with_budget(min_gpu_budget(base, gap=0) * 1.5)
    plan = make_plan(problem, solver="NO_SUCH_SOLVER", with_arena=False)
    assert plan.solver["name"] == "fallback (MEMO rule)" and "not available" in plan.solver["note"]
    assert plan.layers == fallback_decisions(problem)
    assert evaluate(problem, plan.layers).feasible


def test_plan_yaml_round_trip_and_version_check():
    base = small_problem(4, 4, ("host", "nvme"))
    plan = make_plan(base.with_budget(min_gpu_budget(base) * 1.2), with_arena=False)
    again = Plan.from_yaml(plan.to_yaml())
    assert again.problem == plan.problem and again.layers == plan.layers and again.predicted == plan.predicted
    assert evaluate(again.problem, again.layers).step_time_s == plan.predicted["step_time_s"]
    with pytest.raises(ValueError, match="version"):
        Plan.from_dict({**plan.to_dict(), "version": 99})
    assert "layers" in format_plan(plan) and "predicted step" in format_plan(plan)


def test_planner_imports_no_torch():
    code = "import sys, longtune.planner.plan, longtune.planner.milp, longtune.planner.report; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=cli_env())


def test_cli_plan_8b_128k_json(tmp_path):
    result = run_cli("plan", "configs/llama3-8b-128k.yaml", "--json", "--out", tmp_path / "plan.yaml")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["feasible"] is True
    assert out["predicted"]["step_time_s"] > 0
    assert set(out["predicted"]["peak_bytes"]) == {"gpu", "host", "nvme"}
    assert out["predicted"]["peak_bytes"]["gpu"] <= 70e9
    assert len(out["layers"]) == 32
    assert Plan.from_yaml((tmp_path / "plan.yaml").read_text()).layers == out["layers"]


def test_cli_plan_table_and_infeasible_exit_3(tmp_path):
    table = run_cli("plan", "configs/llama3-8b-128k.yaml", "--out", tmp_path / "p.yaml")
    assert table.returncode == 0, table.stderr
    assert "predicted step" in table.stdout and "binding:" in table.stdout
    result = run_cli("plan", "configs/llama3-8b-128k.yaml", "memory.budget_gb=10", "--json", "--out", tmp_path / "q.yaml")
    assert result.returncode == 3
    out = json.loads(result.stdout)
    assert out["feasible"] is False and out["missing_bytes"] > 0
    assert out["min_budget_bytes"] == pytest.approx(10e9 + out["missing_bytes"])
    assert result.stderr.strip().startswith("error: no plan fits a GPU budget of 10.00 GB")
    assert not (tmp_path / "q.yaml").exists()


def test_trainer_refuses_a_placement_the_tiers_cannot_hold_before_building_the_model(tmp_path):
    """Llama-3-8B with the optimizer on the host: 128.5 GB of state and, with 2 micro-batches a step, a micro-batch's
    fp32 gradient of the largest group (embeddings and head, 4.2 GB), checked from the config alone (seconds, no
    16 GB build)."""
    result = run_cli("train", "configs/llama3-8b-128k.yaml", f"run.output_dir={tmp_path / 'r'}", "memory.tiers.host_gb=64",
                     "train.grad_accum_steps=2", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "needs 132.7 GB on the host tier, which holds 64.0 GB: 68.7 GB missing" in result.stderr


def test_memory_plan_file_is_used_as_it_is(tmp_path):
    first = run_cli("plan", "configs/llama3-8b-128k.yaml", "--json", "--out", tmp_path / "plan.yaml")
    assert first.returncode == 0, first.stderr
    again = run_cli("plan", "configs/llama3-8b-128k.yaml", f"memory.plan={tmp_path / 'plan.yaml'}", "--json",
                    "--out", tmp_path / "copy.yaml")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["layers"] == json.loads(first.stdout)["layers"]
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 99\n")
    bad = run_cli("plan", "configs/llama3-8b-128k.yaml", f"memory.plan={broken}")
    assert bad.returncode == 2 and "is not a longtune plan" in bad.stderr


def test_a_budget_bytes_under_an_exact_fit_never_gives_a_negative_shortfall():
    """Solver and evaluator agree on the budget: at the smallest budget the plan passes the evaluator, and a few
    hundred bytes under it the answer is a clear shortfall, never a negative one (nor a silent fallback)."""
    base = small_problem(4, 4)
    low = min_gpu_budget(base, gap=0)
    plan = make_plan(base.with_budget(low), gap=0, with_arena=False)
    assert plan.solver["name"] == "HiGHS" and evaluate(base.with_budget(low), plan.layers).feasible
    for under in (300, 1e6):  # a few hundred bytes under: a plan that passes, or a shortfall; a MB: a shortfall
        try:
            near = make_plan(base.with_budget(low - under), gap=0, with_arena=False)
        except PlanInfeasible as e:
            assert e.missing_bytes > 0 and "-" not in str(e).split("GB missing")[0]
        else:
            assert under < 1e6 and near.solver["name"] == "HiGHS"
            assert evaluate(base.with_budget(low - under), near.layers).feasible


def plan_cli(capsys, *args) -> tuple[int, str, str]:
    """`longtune plan ARGS` in this process (the CLI's own tests cover the subprocess path)."""
    from longtune.launch.cli import main

    code = main(["plan", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("tier, expected", [
    ("{capacity_gb: 100, to_gpu_gbps: 0, from_gpu_gbps: 50}", "tiers.host.to_gpu_gbps must be > 0, got 0"),
    ("{capacity_gb: 100, to_gpu_gbps: -5, from_gpu_gbps: 50}", "tiers.host.to_gpu_gbps must be > 0, got -5"),
    ("{capacity_gb: lots, to_gpu_gbps: 5, from_gpu_gbps: 50}", "tiers.host.capacity_gb must be a finite number, got 'lots'"),
    ("{capacity_gb: .inf, to_gpu_gbps: 5, from_gpu_gbps: 50}", "tiers.host.capacity_gb must be a finite number, got inf"),
    ("{capacity_gb: .nan, to_gpu_gbps: 5, from_gpu_gbps: 50}", "tiers.host.capacity_gb must be a finite number, got nan"),
    ("{capacity_gb: 100, from_gpu_gbps: 50}", "tiers.host.to_gpu_gbps is missing"),
])
def test_machine_profiles_are_checked_on_load(tmp_path, capsys, tier, expected):
    profile = tmp_path / "m.yaml"
    profile.write_text(f"name: bad\ngpu: {{memory_gb: 80, bf16_tflops: 989, matmul_efficiency: 0.6, "
                       f"attention_efficiency: 0.5}}\ntiers:\n  host: {tier}\n")
    code, _, err = plan_cli(capsys, "configs/llama3-8b-128k.yaml", "--machine", profile, "--out", tmp_path / "p.yaml")
    assert code == 2, err
    assert expected in err and len(err.strip().splitlines()) == 1


def test_plan_counts_state_in_the_host_tier_and_honours_host_gb(tmp_path, capsys):
    """Optimizer state on the host takes host capacity, and memory.tiers.host_gb caps it: `longtune plan` says
    what `longtune train` says (exit 3 here: no plan fits)."""
    code, _, err = plan_cli(capsys, "configs/llama3-8b-128k.yaml", "memory.tiers.host_gb=64", "--out", tmp_path / "p.yaml")
    assert code == 3, err
    # the state (a micro-batch's gradient buffer too with accumulation: test_trainer_refuses_a_placement...)
    assert "needs 128.5 GB on the host tier, which holds 64.0 GB: 64.5 GB missing" in err
    code, out, err = plan_cli(capsys, "configs/llama3-8b-128k.yaml", "memory.tiers.host_gb=300", "--json",
                              "--out", tmp_path / "q.yaml")
    assert code == 0, err
    out = json.loads(out)
    assert out["predicted"]["peak_bytes"]["host"] <= 300e9
    assert out["predicted"]["peak_bytes"]["host"] >= 128.5e9  # the state is in it, beside any activations


def test_a_plan_made_for_another_run_is_refused(tmp_path, capsys):
    code, _, err = plan_cli(capsys, "configs/llama3-8b-128k.yaml", "--out", tmp_path / "plan.yaml")
    assert code == 0, err
    for override, fragment in (("data.seq_len=65536", "131072 tokens per micro-batch, this run has 65536"),
                               ("memory.budget_gb=60", "a GPU budget of 70.00 GB, this run's is 60.00 GB"),
                               ("model.config.num_hidden_layers=16", "32 layers, this model has 16")):
        code, _, err = plan_cli(capsys, "configs/llama3-8b-128k.yaml", f"memory.plan={tmp_path / 'plan.yaml'}", override,
                                "--out", tmp_path / "other.yaml")
        assert code == 2, (override, err)
        assert "was made for another run" in err and fragment in err, err


def _edited(path, tmp_path, name, edit):
    """The plan file at `path`, changed by edit(plan dict), written to tmp_path/name."""
    import yaml

    data = yaml.safe_load(path.read_text())
    edit(data)
    out = tmp_path / name
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _set_layer(l, c, d):
    return lambda data: data["layers"][l].__setitem__(c, d)


def test_a_plan_file_is_a_contract(tmp_path, capsys):
    """A plan file runs only if it is valid for this run: its decisions are checked and costed with this run's own
    bytes (a hand edit that breaks the budget, chunk counts that do not add up, a place that does not exist, a
    split attention output), and the settings the bytes depend on are compared (ranks and sharding, the fused
    loss, the state's placement). Each is refused in one line naming it. Before: they ran (with a warning, or to
    an internal error after the model had loaded)."""
    cfg = "configs/llama3-8b-128k.yaml"
    code, _, err = plan_cli(capsys, cfg, "--out", tmp_path / "plan.yaml")
    assert code == 0, err
    plan = tmp_path / "plan.yaml"
    everything_kept = lambda data: data.__setitem__("layers", [{c: {"gpu": 16} for c in CLASSES}] * 32)  # noqa: E731
    cases = [
        (_edited(plan, tmp_path, "kept.yaml", everything_kept), [],
         "its decisions do not fit this run: GPU peak"),
        (_edited(plan, tmp_path, "sum.yaml", _set_layer(0, "pre", {"gpu": 3})), [],
         "layer 0 pre: chunks {'gpu': 3} do not add up to 16"),
        (_edited(plan, tmp_path, "attn.yaml", _set_layer(1, "attn", {"recompute": 16})), [],
         "layer 1 attn: cannot be recomputed"),
        (_edited(plan, tmp_path, "disk.yaml", _set_layer(2, "input", {"disk": 16})), [],
         "layer 2 input: unknown place ['disk']"),
        (_edited(plan, tmp_path, "split.yaml", _set_layer(3, "attn", {"gpu": 8, "host": 8})), [],
         "layer 3 attn: must go whole to one place"),
        (_edited(plan, tmp_path, "word.yaml", _set_layer(4, "post", "lots")), [],
         "layer 4 post: 'lots' is not a mapping of place to a whole number of chunks"),
        (plan, ["model.kernels.fused_ce=false"], "an LM head step of"),
        (plan, ["memory.optimizer=gpu"], "it places the state as optimizer=cpu params=gpu, which this run's"),
    ]
    for path, overrides, fragment in cases:
        code, _, err = plan_cli(capsys, cfg, f"memory.plan={path}", *overrides, "--out", tmp_path / "other.yaml")
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, (path.name, overrides, err)

    on_gpu = "memory.optimizer=gpu"  # FSDP2 owns the state
    code, _, err = plan_cli(capsys, cfg, on_gpu, "--nproc", "8", "parallel.strategy=fsdp2", "--out", tmp_path / "fsdp8.yaml")
    assert code == 0, err
    code, _, err = plan_cli(capsys, cfg, on_gpu, f"memory.plan={tmp_path / 'fsdp8.yaml'}", "--out", tmp_path / "other.yaml")
    assert code == 2 and "ranks: 8, this run has 1" in err and "sharded state: optimizer, grads, weights" in err, err


def test_a_plan_file_is_costed_for_this_run_and_its_arena_packed_again(tmp_path, tiny_config):
    """The documented flow, `longtune plan CFG memory.budget_gb=X --out p.yaml` then a run with memory.plan=p.yaml on
    this machine: the file's tiers were the profile's (768 GB of host, an NVMe drive), this machine has less,
    and the run's plan uses under a MB of host; it is accepted, compared by what it uses. A hand edit that
    offloads more than the file's arena holds (here: an empty one) runs too: the arena is packed again for the
    decisions (before: an internal error in the movers after the model had loaded). One training step runs it.
    The flow is what is checked, not the model: the tiny Llama (conftest), not the quick start's SmolLM2 (whose
    GGUF parse, in both processes, was most of the time)."""
    tiny_config["data"]["seq_len"] = 256
    config = write_yaml(tmp_path / "tiny.yaml", tiny_config)
    quick = ["train.max_steps=1", "checkpoint.every_n_steps=0", "data.passkey.eval_samples=0", "memory.budget_gb=3",
             "memory.plan_chunks=2"]
    out = run_cli("plan", config, *quick, "--out", tmp_path / "plan.yaml", timeout=300)
    assert out.returncode == 0, out.stderr
    to_host = lambda data: data.__setitem__("layers", [{**layer, "input": {"host": 2}, "post": {"host": 2}}  # noqa: E731
                                                       for layer in data["layers"]])
    edited = _edited(tmp_path / "plan.yaml", tmp_path, "edited.yaml", to_host)
    run = run_cli("train", config, *quick, f"memory.plan={edited}", f"run.output_dir={tmp_path / 'run'}", timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics)


def test_a_machine_without_a_host_tier_keeps_the_state_on_the_gpu():
    """State on NVMe is stepped and staged in host memory: with only an NVMe tier, `auto` leaves the optimizer
    and the weights on the GPU (it used to reach for the missing host link and fail)."""
    from longtune.planner.problem import state_options

    shape = ModelShape.from_hf_config({**LLAMA_8B, "num_hidden_layers": 2}, "bfloat16")
    nvme_only = Machine("nvme-only", 80e9, 989e12, 0.6, 0.5, (Tier("nvme", 1e12, 5e9, 5e9),))
    options = state_options(shape, nvme_only, layer_fwd_s=0.01)
    assert {(o.optimizer, o.params) for o in options} == {("gpu", "gpu")}
    make_plan(build_problem(shape, 8192, nvme_only, chunks=1, optimizer="auto", params="auto").with_budget(80e9))


def test_the_host_buffers_nvme_activations_pass_through_are_counted_in_the_host_tier():
    """NVMe activations pass through depth + 2 host buffers the size of the largest layer's NVMe region
    (offload/stash.py); the plan counts them in the host tier, and the solver keeps them inside it."""
    from dataclasses import replace

    from longtune.planner.timeline import REGION_SLACK_BYTES, nvme_ring_slots

    problem = small_problem(3, 2, tiers=("host", "nvme"))
    B, G = problem.chunk_bytes, problem.chunks
    keep = {c: {GPU: G} for c in CLASSES}
    to_nvme = {**keep, "post": {"nvme": G}}
    plain = evaluate(problem, [keep] * 3).tier_bytes["host"]
    staged = evaluate(problem, [keep, to_nvme, keep]).tier_bytes["host"]
    assert staged - plain == pytest.approx(nvme_ring_slots(problem.prefetch_depth) * (B["post"] + REGION_SLACK_BYTES) * G)

    # Six layers whose inputs must leave the GPU, and host room for the state and 3.5 layers' inputs: all of
    # them on the host does not fit, three there and three on NVMe would (3 + a ring of 3 = 6 > 3.5 in truth);
    # with the ring counted the solver's plan fits the host tier as the runtime will fill it.
    problem = small_problem(6, 2, tiers=("host", "nvme"))
    state_host = problem.state(None).tier_bytes["host"]
    inputs = (B["input"] + REGION_SLACK_BYTES) * G
    capacity = state_host + 3.5 * inputs
    tight = replace(problem, tiers=tuple(replace(t, capacity_bytes=capacity) if t.name == "host" else t
                                         for t in problem.tiers))
    plan = make_plan(tight.with_budget(min_gpu_budget(tight) * 1.02))
    assert "nvme" in {p for layer in plan.layers for p in layer["input"]}, plan.layers
    host_acts = sum(B[c] * d.get("host", 0) for layer in plan.layers for c, d in layer.items())
    ring = nvme_ring_slots(1) * max(sum((B[c] + REGION_SLACK_BYTES) * d.get("nvme", 0) for c, d in layer.items())
                                    for layer in plan.layers)
    assert plan.predicted["peak_bytes"]["host"] == pytest.approx(state_host + host_acts + ring)
    assert state_host + host_acts + ring <= capacity
    half = [{**layer, "input": {"host" if l < 3 else "nvme": G}} for l, layer in enumerate(plan.layers)]
    assert evaluate(tight, half, plan.state).violations  # three and three: the host would overflow


def test_fitted_rates_make_the_planned_compute_equal_the_measured_steps():
    """`longtune probe --config` times the model at two lengths and fits the matmul and attention rates: a plan
    built with them predicts exactly those step times (its compute: every layer's forward and backward + the
    head), so the fit and build_problem price a step alike; a step time that does not grow is refused."""
    from longtune.planner.problem import fitted_rates

    shape = ModelShape.from_hf_config({**LLAMA_8B, "num_hidden_layers": 4}, "bfloat16")
    measured = {1024: 0.5, 4096: 3.1}
    matmul, attention = fitted_rates(shape, measured)
    peak = max(matmul, attention)
    machine = Machine("fitted", 80e9, peak, matmul / peak, attention / peak, ())
    for tokens, seconds in measured.items():
        problem = build_problem(shape, tokens, machine, chunks=1, optimizer="gpu")
        planned = problem.num_layers * (problem.layer_fwd_s + problem.layer_bwd_s) + problem.head_s
        assert planned == pytest.approx(seconds, rel=1e-9)
    with pytest.raises(ValueError, match="do not grow"):
        fitted_rates(shape, {1024: 2.0, 4096: 2.0})


def test_recompute_factors_price_each_part_and_the_plan_splits_its_recompute_by_part():
    """A profile's gpu.recompute_factor (`longtune probe --config`) multiplies each part's recompute price; the
    plan's recompute by part is its chunks recomputed at those prices and sums to its predicted recompute."""
    from dataclasses import replace

    from longtune.planner.plan import plan_of
    from longtune.planner.problem import ProfileError

    shape = ModelShape.from_hf_config({**LLAMA_8B, "num_hidden_layers": 2}, "bfloat16")
    plain = Machine.load("h100-pcie5")
    slow = replace(plain, pre_recompute_factor=2.0, post_recompute_factor=3.0)
    a, b = (build_problem(shape, 4096, m, chunks=4, optimizer="gpu") for m in (plain, slow))
    assert b.recompute_s["pre"] == pytest.approx(2 * a.recompute_s["pre"])
    assert b.recompute_s["post"] == pytest.approx(3 * a.recompute_s["post"])
    decisions = [{c: ({RECOMPUTE: 4} if c == "post" or (c == "pre" and l) else {GPU: 4}) for c in CLASSES}
                 for l in range(2)]
    plan = plan_of(b, decisions)
    assert plan.recompute_by_part() == pytest.approx({"pre": 4 * b.recompute_s["pre"], "post": 8 * b.recompute_s["post"]})
    assert sum(plan.recompute_by_part().values()) == pytest.approx(plan.predicted["recompute_s"])
    profile = {"gpu": {"memory_gb": 80, "bf16_tflops": 900, "matmul_efficiency": 0.5, "attention_efficiency": 0.5,
                       "recompute_factor": {"pre": 1.5, "post": 1.25}}}
    m = Machine.from_dict(profile)
    assert (m.pre_recompute_factor, m.post_recompute_factor) == (1.5, 1.25)
    with pytest.raises(ProfileError, match="recompute_factor must be a mapping of pre and post"):
        Machine.from_dict({**profile, "gpu": {**profile["gpu"], "recompute_factor": {"mlp": 2}}})
    with pytest.raises(ProfileError, match="gpu.recompute_factor.pre must be > 0"):
        Machine.from_dict({**profile, "gpu": {**profile["gpu"], "recompute_factor": {"pre": 0}}})
