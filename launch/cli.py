"""`longtune` command line.

Exit codes: 0 success; 2 bad config, input or usage (one line on stderr); 1 runtime failure (one line);
3 (plan) no plan fits the memory budget; 130 interrupted (SIGINT); 143 stopped by SIGTERM (a checkpoint saved
first, where the run checkpoints). `--debug` prints the traceback behind any error.

Nothing heavy is imported before the command line and the config are checked: `--help`, usage errors and
config errors answer without loading torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Optional, Sequence

from longtune.launch.isolation import keep_checkout_off_sys_path, safe_env

# First, before anything could import one of our folders under its bare name: `python -m longtune.launch.cli`,
# and torchrun's ranks (launch/torchrun.py imports this module), start with the current folder on sys.path.
keep_checkout_off_sys_path()

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INFEASIBLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_RUN_DIR: Optional[str] = None  # the run folder `train` or `resume` works in, for the line an interrupt prints
MAX_ERROR_CHARS = 500

EPILOG = "Overrides are dotted keys typed as YAML: train.max_steps=12 train.lr=3e-4 log.sinks=[console,jsonl]"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other usage error
        raise UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="longtune", description="Long-context fine-tuning of Hugging Face causal LMs.")
    parser.add_argument("--debug", action="store_true", help="print the traceback behind an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train from a YAML config", description="Train from a YAML config.", epilog=EPILOG)
    train.add_argument("config", nargs="?", default="quickstart", help="YAML file, or the name of a bundled config (default: quickstart)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _add_launch_arguments(train)

    resume = sub.add_parser("resume", help="continue a run from its newest complete checkpoint", epilog=EPILOG,
                            description="Continue RUN_DIR from its newest complete checkpoint (incomplete ones are skipped).")
    resume.add_argument("run_dir", help="the run's output_dir")
    resume.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. train.max_steps=200")
    resume.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _add_launch_arguments(resume)

    plan = sub.add_parser("plan", help="solve the memory plan for a config (no GPU needed)", epilog=EPILOG,
                          description="Solve and print the memory plan: per layer and activation class, what stays on the GPU, "
                                      "goes to host/NVMe, or is recomputed. Exit 3 when no plan fits memory.budget_gb.")
    plan.add_argument("config", help="YAML file, or the name of a bundled config")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. memory.budget_gb=60")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    plan.add_argument("--machine", help="machine profile YAML (or bundled name) instead of memory.machine")
    plan.add_argument("--out", help="where to write plan.yaml (default: RUN.output_dir/plan.yaml)")
    plan.add_argument("--nproc", type=int, metavar="N", help="plan one rank of N processes under parallel.strategy "
                      "(default: launch.ray.num_workers with launch.backend=ray, else parallel.sequence_parallel)")
    plan.add_argument("--longest", action="store_true", help="also search the longest data.seq_len that fits (always "
                      "done with parallel.sequence_parallel > 1)")
    plan.add_argument("--dry-run", action="store_true", help="then run one full-size step of the plan on tensors "
                      "that hold no data (meta/fake, no GPU) and print its peak bytes per tier beside the plan's; "
                      "exit 3 if it passes the budget")
    plan.add_argument("--timeline", metavar="PNG", help="with --dry-run: draw the step's memory over time (matplotlib)")

    probe = sub.add_parser("probe", help="measure this machine's memory tiers and write a machine profile",
                           description="Measure GPU (or CPU) throughput, host and CXL copy bandwidth, and NVMe read/write "
                                       "bandwidth through the tiers' own I/O paths; write the machine profile that "
                                       "memory.machine and `longtune plan --machine` read.")
    probe.add_argument("--out", default="machine.yaml", help="profile to write (default: machine.yaml)")
    probe.add_argument("--nvme-path", help="folder on the NVMe drive to measure (default: no NVMe tier)")
    probe.add_argument("--size-mb", type=int, default=1024, help="working set of each bandwidth test (default: 1024)")
    probe.add_argument("--nvme-backend", choices=["auto", "threads", "aio"], default="auto")
    probe.add_argument("--emulate-cxl-gbps", type=float, help="with no CXL node, emulate a cxl tier on the local node at this bandwidth")
    probe.add_argument("--config", help="also train this config two steps at each of two lengths (nothing offloaded) "
                       "and write the matmul and attention rates at which the planner's step time equals it; then the shorter "
                       "length once more with every chunk recomputed, for the recompute's factors")
    probe.add_argument("--lengths", default="1024,4096", help="with --config: the two sequence lengths (default: 1024,4096)")

    from longtune.bench.runner import add_arguments as bench_arguments

    bench = sub.add_parser("bench", help="longtune and the tools users run today, side by side on this machine",
                           description="Run longtune and its peers (transformers with and without gradient checkpointing, "
                                       "save_on_cpu, Liger Kernel, galore-torch, DeepSpeed ZeRO-3 offload) under one memory "
                                       "cap: the longest trainable context by bisection, tokens/s, peak memory; a table, "
                                       "and JSON in bench/results/. The peers install with pip install -e '.[bench]'.")
    bench_arguments(bench)

    export = sub.add_parser("export", help="write a transformers save_pretrained folder",
                            description="Write a run's newest complete checkpoint as a transformers folder (weights, config, tokenizer); "
                                        "a run with adapters as a peft adapter folder, or merged with --merge.")
    export.add_argument("run_dir", help="the run's output_dir")
    export.add_argument("--out", required=True, help="folder to write")
    export.add_argument("--step", type=int, default=None, help="export step_N instead of the newest complete checkpoint")
    export.add_argument("--force", action="store_true", help="write into --out even if it holds files already")
    export.add_argument("--merge", action="store_true", help="a run with adapters: write the merged model, not a "
                                                             "peft adapter folder")
    return parser


def _add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("processes (torchrun: these are passed to torch.distributed.run)")
    g.add_argument("--nproc", type=int, metavar="N", help="processes on this machine (one per GPU); runs torchrun")
    g.add_argument("--nnodes", help="machines, or MIN:MAX for an elastic job (needs --rdzv-endpoint)")
    g.add_argument("--node-rank", type=int, help="this machine's rank (static rendezvous)")
    g.add_argument("--rdzv-endpoint", help="host:port of the c10d rendezvous every machine joins")
    g.add_argument("--rdzv-id", help="the job's rendezvous id (the same on every machine)")
    g.add_argument("--max-restarts", type=int, help="restarts of the group after a failure; each resumes from the "
                                                     "newest complete checkpoint")


LAUNCH_FLAGS = ("nnodes", "node_rank", "rdzv_endpoint", "rdzv_id", "max_restarts")


def _torchrun(args: argparse.Namespace, argv: list[str], device: str, grace_s: float) -> int:
    """`longtune train CFG --nproc N ...`: torch.distributed.run starting N ranks of the same command."""
    from longtune.launch.distributed import launched_world

    if launched_world() > 1:
        raise UsageError("--nproc and the torchrun flags start processes; this one is a rank of a launched group already")
    nproc = 1 if args.nproc is None else args.nproc  # (--nproc 0 is an error, not 1)
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    import torch

    from longtune.trainer.ranks import device_type, gpus_short

    try:
        short = device_type(device) == "cuda" and gpus_short(nproc, torch.cuda.device_count())
    except ValueError as e:
        raise UsageError(str(e)) from None
    if short:  # before any rank starts: rank 1 would die on a cuda:1 that does not exist
        raise UsageError(f"--nproc {nproc}: {short}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device_type(device) == "cpu" and nproc > cores:
        print(f"warning: --nproc {nproc} on {cores} CPU core(s): the ranks share them, each step waits for the "
              f"slowest, and the run is slower than with --nproc {cores} (run.device=cpu)", file=sys.stderr)
    multi_node = args.nnodes not in (None, "1", "1:1")
    if multi_node and not args.rdzv_endpoint:
        raise UsageError("--nnodes over 1 needs --rdzv-endpoint HOST:PORT (the same on every machine)")
    launcher = [f"--nproc-per-node={nproc}"]
    launcher += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in LAUNCH_FLAGS if getattr(args, k) is not None]
    if multi_node or args.rdzv_endpoint:
        launcher += ["--rdzv-backend=c10d"]
    else:
        launcher += ["--standalone"]
    rank_argv, skip = [], False
    flags = {"--nproc", *(f"--{k.replace('_', '-')}" for k in LAUNCH_FLAGS)}
    for a in argv:  # the ranks run the same command without the launch flags
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in flags:
            skip = "=" not in a
            continue
        rank_argv.append(a)
    if args.max_restarts:
        # A restarted group reuses the agent's store, whose keys of the failed round break gloo's reconnect
        # (pytorch #135712): the ranks get a store of their own instead.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    from torch.distributed.run import main as torchrun_main

    from longtune.launch.distributed import pass_sigterm_to_ranks

    print(f"torchrun {' '.join(launcher)} -m longtune.launch.torchrun {' '.join(rank_argv)}", flush=True)
    stop = pass_sigterm_to_ranks(grace_s)
    try:
        torchrun_main([*launcher, "-m", "longtune.launch.torchrun", *rank_argv])
    except Exception as e:  # noqa: BLE001 -- torchrun's ChildFailedError: the ranks printed their own errors
        stop.raise_if_stopped()
        _raise_for_signal(getattr(e, "sigval", None))  # torchrun's agent took SIGINT, SIGHUP or SIGQUIT
        failures = getattr(e, "failures", None) or {}
        which = ", ".join(f"rank {r} {_exit_text(f.exitcode)}" for r, f in sorted(failures.items())) or _first_line(e)
        raise _RanksFailed(f"the training processes failed ({which}); each rank's own error is above") from None
    return EXIT_OK


def _raise_for_signal(sigval) -> None:
    """The launcher stopped on a signal (passed on to the ranks): an interrupt for SIGINT, a stop for the others."""
    if sigval is None:
        return
    import signal

    from longtune.trainer.errors import Stopped

    if sigval == signal.SIGINT:
        raise KeyboardInterrupt
    raise Stopped(f"stopped by {signal.Signals(sigval).name}: the ranks were stopped with it; longtune resume goes "
                  "on from the newest complete checkpoint", sigval)


def _exit_text(code: int) -> str:
    """A rank's end as torchrun reports it: an exit code, or (negative) the signal that killed it."""
    import signal

    try:
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    except ValueError:
        return f"exit code {code}"


def _flags_first(argv: list[str]) -> list[str]:
    """`longtune train CFG k=v --nproc 2`: argparse takes no option after the overrides, so the options move to
    just after the command."""
    commands = [i for i, a in enumerate(argv) if a in ("train", "resume", "plan")]
    if not commands:
        return argv
    at = commands[0] + 1
    valued = {"--nproc", "--machine", "--out", *(f"--{k.replace('_', '-')}" for k in LAUNCH_FLAGS)}
    head, moved, rest, i = argv[:at], [], [], at
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in valued and "=" not in a and i + 1 < len(argv):
            moved += argv[i:i + 2]
            i += 2
            continue
        (moved if name in valued or a in ("--print-config", "--json", "--longest") else rest).append(a)
        i += 1
    return head + moved + rest


class _RanksFailed(Exception):
    pass


def _split_config_and_overrides(config: str, overrides: list[str]) -> tuple[str, list[str]]:
    # `longtune train train.max_steps=3` means the default config with an override.
    if "=" in config and not Path(config).exists():
        return "quickstart", [config, *overrides]
    return config, overrides


def _resume_config(run_dir: str, overrides: list[str]):
    """The config of `longtune resume RUN_DIR`: the run's own, continued from its newest complete checkpoint; given
    a checkpoint folder (RUN_DIR/step_N) instead, the run it belongs to, continued from that checkpoint."""
    from longtune.trainer.config import load_config
    from longtune.trainer.inputs import run_folder_of

    run, step = run_folder_of(run_dir, "longtune resume")
    given = {o.split("=", 1)[0].strip() for o in overrides}
    if "run.output_dir" in given:
        raise UsageError(f"longtune resume continues the run in {run}; run.output_dir cannot be changed (to start a "
                         "new run elsewhere: longtune train CONFIG run.output_dir=...)")
    if step is not None and "run.resume" in given:
        raise UsageError(f"longtune resume: {run_dir} is a checkpoint already; drop the run.resume override")
    resume = [f"run.resume={run / f'step_{step}'}"] if step is not None else [] if "run.resume" in given else ["run.resume=auto"]
    if step is not None:
        print(f"{run_dir} is a checkpoint of the run in {run}: resuming that run from step {step}")
    return load_config(run / "config.resolved.yaml", [*overrides, f"run.output_dir={run}", *resume])


# What a resumed run cannot change: the model is rebuilt from its checkpoint's config.json, the tokenizer from the
# run's own copy, so these overrides would be recorded in config.resolved.yaml but not trained. With adapters the
# frozen base is built from model.* (it is not in the checkpoint), and a base of another shape fails to load.
RESUME_FIXED_MODEL = ("path", "gguf_file", "config", "rope_scaling", "max_position_embeddings", "tokenizer")


def _refuse_what_a_resume_ignores(cfg, run: Path) -> None:
    """After the overrides' own checks (a value that is wrong in itself says so first)."""
    from longtune.trainer.config import load_config
    from longtune.trainer.inputs import data_change_refusal

    was = load_config(run / "config.resolved.yaml")
    refused = data_change_refusal(was.model_dump(), cfg, run, f"{run} has")  # what the data position counts
    if refused:
        raise UsageError(f"longtune resume: {refused}")
    if cfg.adapter.kind != "none":
        return
    for key in RESUME_FIXED_MODEL:
        old, new = getattr(was.model, key), getattr(cfg.model, key)
        if old != new:
            where, old, new = _first_difference(f"model.{key}", old, new)
            raise UsageError(f"longtune resume: {where}={new} cannot change in a resumed run ({run} has {where}={old}; "
                             "its checkpoint holds the model as it was, and the model is rebuilt from it): start a "
                             f"new run for it (from this run's weights: longtune export {run} --out DIR, then "
                             "model.path=DIR)")


def _first_difference(where: str, old, new):
    """The dotted key of the first place two values differ, and their values there."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            if old.get(k) != new.get(k):
                return _first_difference(f"{where}.{k}", old.get(k), new.get(k))
    return where, old, new


def run(args: argparse.Namespace) -> int:
    from longtune.trainer.config import dump_config, load_config

    if args.command == "export":
        from longtune.trainer.inputs import check_export_out, run_folder_of

        run, step = run_folder_of(args.run_dir, "longtune export")
        if step is not None and args.step is not None and step != args.step:
            raise UsageError(f"longtune export: {args.run_dir} is step {step}, but --step {args.step} was given")
        check_export_out(args.out, args.force, run)
        from longtune.trainer.train import export

        path = export(run, Path(args.out), step if step is not None else args.step, merge=args.merge)
        print(f"exported {path} -> {args.out}")
        return EXIT_OK
    if args.command == "plan":
        return run_plan(args)
    if args.command == "probe":
        return run_probe(args)
    if args.command == "bench":
        from longtune.bench.runner import run as run_bench

        return run_bench(args, safe_env)  # its probes are Python children, kept off the repo root like ours
    if args.command == "train":
        cfg = load_config(*_split_config_and_overrides(args.config, args.overrides))
    else:
        cfg = _resume_config(args.run_dir, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return EXIT_OK
    from longtune.trainer.inputs import check

    global _RUN_DIR
    _RUN_DIR = cfg.run.output_dir
    check(cfg)  # model, data, resume and run folder, before torch is imported
    if args.command == "resume" and args.overrides:
        _refuse_what_a_resume_ignores(cfg, Path(cfg.run.output_dir))
    if args.nproc is not None or any(getattr(args, k) is not None for k in LAUNCH_FLAGS):
        if cfg.launch.backend == "ray":
            raise UsageError("--nproc starts torchrun; launch.backend=ray starts Ray workers (launch.ray.num_workers): "
                             "choose one")
        return _torchrun(args, args.argv, cfg.run.device, cfg.parallel.timeout_s)
    if cfg.launch.backend == "ray":
        from longtune.launch.distributed import launched_world

        if launched_world() == 1:  # the driver; inside a Ray worker the group is already there
            from longtune.launch.ray_launch import run_on_ray

            return run_on_ray(cfg, debug=args.debug)
    from longtune.launch.distributed import init_process_group, launched_world, prefix_output, restarted
    from longtune.trainer.errors import install_stop_handlers

    install_stop_handlers()  # SIGTERM: a checkpoint at the next step boundary, then exit 143
    if launched_world() > 1 or cfg.parallel.strategy in ("fsdp2", "deepspeed"):
        init_process_group(cfg.parallel.timeout_s, alone=launched_world() == 1, device=cfg.run.device)
        import torch.distributed as dist

        prefix_output(dist.get_rank(), dist.get_world_size())
        if restarted() and cfg.run.resume is None:
            print("torchrun restarted the group: continuing from the newest complete checkpoint (run.resume=auto)")
            cfg.run.resume = "auto"
    from longtune.trainer.train import train

    result = train(cfg)
    summary = f"done: step {result.step}, last loss {result.last_loss if result.last_loss is None else f'{result.last_loss:.4g}'}"
    if result.eval:
        summary += ", " + ", ".join(f"{k} {v:.4g}" for k, v in result.eval.items())
    print(f"{summary}; run folder {result.output_dir}")
    return EXIT_OK


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=file or sys.stderr)


def run_plan(args: argparse.Namespace) -> int:
    import json

    from longtune.planner.plan import PlanInfeasible
    from longtune.planner.report import format_plan
    from longtune.trainer.config import load_config
    from longtune.trainer.capacities import load_machine, profile_capacities
    from longtune.trainer.longest import longest_over_placements
    from longtune.trainer.planning import plan_memory

    if args.timeline and not args.dry_run:
        raise UsageError("longtune plan: --timeline draws the dry run's step; add --dry-run")
    cfg = load_config(*_split_config_and_overrides(args.config, args.overrides))
    out = Path(args.out) if args.out else Path(cfg.run.output_dir) / "plan.yaml"
    if out.is_dir():
        raise UsageError(f"longtune plan: {'--out' if args.out else 'run.output_dir/plan.yaml'} {out} is a folder; give a file name")
    machine = load_machine(args.machine or cfg.memory.machine)
    sp = cfg.parallel.sequence_parallel
    world = args.nproc if args.nproc is not None else (cfg.launch.ray.num_workers if cfg.launch.backend == "ray" else sp)
    if world < 1:
        raise UsageError(f"longtune plan: --nproc must be at least 1, got {world}")
    if world % sp:
        raise UsageError(f"longtune plan: --nproc {world} is not a multiple of parallel.sequence_parallel={sp}")
    plan = infeasible = longest = None
    try:  # `longtune plan` always plans the activations: that is what it is for
        plan = plan_memory(cfg, profile_capacities(cfg, machine, world), machine, activations=True, world=world)
    except PlanInfeasible as e:
        infeasible = e
    if args.longest or sp > 1:  # after the plan above: a config that cannot be planned is refused first
        def progress(n: int, fits: bool) -> None:
            print(f"  {n:>12,} tokens: {'fits' if fits else 'does not fit'}", file=sys.stderr, flush=True)

        print(f"searching the longest context on {world} GPU(s) of {machine.name}...", file=sys.stderr, flush=True)
        longest = longest_over_placements(cfg, machine, world, progress, solved={cfg.data.seq_len: plan})
    if infeasible is not None:
        e = infeasible
        if args.json:
            print(json.dumps({"feasible": False, "budget_bytes": e.budget_bytes, "min_budget_bytes": e.min_budget_bytes,
                              "missing_bytes": e.missing_bytes, "reason": str(e),
                              **(_longest_json(longest) if longest else {})}))
        elif longest:
            print(_longest_lines(cfg, machine, world, longest))
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INFEASIBLE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(plan.to_yaml())
    if not args.json:
        print(format_plan(plan))
        print(f"plan written to {out}")
        if longest:
            print(_longest_lines(cfg, machine, world, longest))
    dry = _dry_run(args, cfg, plan, world) if args.dry_run else None
    if args.json:
        print(json.dumps({"feasible": True, "plan_file": str(out), **plan.to_dict(),
                          **(_longest_json(longest) if longest else {}),
                          **({"dry_run": _dry_dict(plan, dry)} if dry else {})}))
    if dry and dry.peak_bytes["gpu"] > plan.problem.budget_bytes:
        return EXIT_INFEASIBLE
    return EXIT_OK


def _dry_run(args: argparse.Namespace, cfg, plan, world: int):
    from longtune.trainer.dry_run import draw_timeline, dry_run, format_dry_run

    if world != cfg.parallel.sequence_parallel:
        raise UsageError(f"longtune plan --dry-run: runs one rank of a sequence group (world = "
                         f"parallel.sequence_parallel), not {world} processes of data parallelism")
    print("dry run: one step of the plan on meta and fake tensors...", file=sys.stderr, flush=True)
    run = dry_run(cfg, plan, timeline=bool(args.timeline))
    if not args.json:
        print(format_dry_run(plan, run))
    if args.timeline:
        draw_timeline(plan, run, args.timeline, f"{cfg.run.output_dir}: {cfg.data.seq_len:,} tokens, one step")
        print(f"timeline drawn to {args.timeline}", file=sys.stderr)
    return run


def _dry_dict(plan, run) -> dict:
    from longtune.trainer.dry_run import compare

    return {"ops": run.ops, "forward_ops": run.forward_ops, "seconds": run.seconds,
            "bytes": {what: {"plan": planned, "dry_run": measured} for what, planned, measured in compare(plan, run)}}


def _longest_dict(found) -> dict:
    plan = found.plan
    return {"seq_len": found.seq_len, "step_time_s": plan.predicted["step_time_s"] if plan else None,
            "tokens_per_s": plan.predicted["tokens_per_s"] if plan else None, "placement": found.placement,
            "optimizer_tier": plan.optimizer_tier if plan else None, "params_tier": plan.params_tier if plan else None,
            "binding": plan.binding if plan else None, "next_failure": found.next_failure}


def _longest_json(longest: list) -> dict:
    """`longest_context`: with the config's placement (what `longtune train` with this config can run);
    `longest_by_placement`: that, and with the solver placing the state."""
    return {"longest_context": _longest_dict(longest[0]), "longest_by_placement": [_longest_dict(f) for f in longest]}


def _longest_lines(cfg, machine, world: int, longest: list) -> str:
    from longtune.trainer.longest import SEARCH_STEP_TOKENS

    sp = cfg.parallel.sequence_parallel
    split = f" ({world // sp} x sequence parallel {sp})" if sp > 1 else ""
    lines = []
    for found in longest:
        n, plan = found.seq_len, found.plan
        if plan is None:
            lines.append(f"longest context on {world} GPU(s) of {machine.name}{split} with {found.placement}: none fits")
            continue
        p = plan.predicted
        lines.append(f"longest context on {world} GPU(s) of {machine.name}{split} with {found.placement}: {n:,} tokens "
                     f"per sequence, {found.state_placement} (predicted step {p['step_time_s']:.1f} s, "
                     f"{p['tokens_per_s']:,.0f} tokens/s per sequence group)")
        binding = "; ".join(plan.binding) or "no limit is tight"
        why = f": {found.next_failure}" if found.next_failure else ""
        lines.append(f"  at {n:,} tokens the plan presses on: {binding}; {n + SEARCH_STEP_TOKENS * sp:,} does not fit{why}")
    return "\n".join(lines)


def _probe_lengths(text: str) -> tuple[int, int]:
    try:
        lengths = tuple(sorted(int(x) for x in text.split(",")))
    except ValueError:
        lengths = ()
    if len(lengths) != 2 or lengths[0] < 16 or lengths[1] < 2 * lengths[0]:
        raise UsageError(f"longtune probe: --lengths takes two token counts, the second at least twice the first "
                         f"(e.g. 1024,4096), got {text!r}")
    return lengths


def _model_compute(cfg, config: str, lengths: tuple[int, int], profile: dict) -> dict:
    """`longtune probe --config`: the config's step as the runtime runs it (trainer/calibrate.py) at two lengths,
    the rates at which the planner prices it so, and at those rates the recompute's factors."""
    import tempfile

    import yaml

    from longtune.planner.problem import ModelShape, fitted_rates
    from longtune.trainer.calibrate import per_token_grows, recompute_factors, step_compute_seconds
    from longtune.trainer.planning import hf_config_dict

    gpu = profile["gpu"]
    print(f"timing the step of {config} at {lengths[0]:,} and {lengths[1]:,} tokens (two steps each, nothing "
          f"offloaded), then at {lengths[0]:,} with every chunk recomputed ...")
    with tempfile.TemporaryDirectory(prefix="longtune-probe-") as tmp:
        machine = Path(tmp) / "machine.yaml"
        machine.write_text(yaml.safe_dump(profile))
        budget = 0.9 * gpu["memory_gb"]
        seconds, plans = step_compute_seconds(cfg, lengths, str(machine), budget)
        shape = ModelShape.from_hf_config(hf_config_dict(cfg), cfg.model.dtype)
        peak = gpu["bf16_tflops"] * 1e12
        try:
            matmul, attention = fitted_rates(shape, seconds, peak * gpu["attention_efficiency"])
        except ValueError as e:
            raise UsageError(f"longtune probe --config: {e}") from None
        grows = per_token_grows(seconds)  # else fitted_rates priced attention at the kernel's rate
        if not grows:
            print("  the step's time per token does not grow with its length (a small model, or a busy machine): "
                  "attention is priced at the attention kernel's measured rate, the rest fitted to the longer length")
        peak = max(peak, matmul, attention)
        fitted = {"bf16_tflops": round(peak / 1e12, 4), "matmul_efficiency": round(matmul / peak, 4),
                  "attention_efficiency": round(attention / peak, 4)}
        machine.write_text(yaml.safe_dump({**profile, "gpu": {**gpu, **fitted}}))
        factors = recompute_factors(cfg, plans[lengths[0]], str(machine), budget)
    return {**fitted, "recompute_factor": {part: round(f, 4) for part, f in factors.items()},
            "calibrated": {"config": str(config), "step_s": {str(n): round(s, 4) for n, s in seconds.items()},
                           "matmul_tflops": round(matmul / 1e12, 4), "attention_tflops": round(attention / 1e12, 4),
                           "attention_from": "the step" if grows else "the attention kernel"}}


def run_probe(args: argparse.Namespace) -> int:
    import yaml

    from longtune.offload.probe import probe

    if args.size_mb < 16:
        raise UsageError(f"longtune probe: --size-mb must be at least 16, got {args.size_mb}")
    if args.config:  # the config and the lengths checked before anything is measured
        from longtune.trainer.config import load_config

        lengths, cfg = _probe_lengths(args.lengths), load_config(args.config)
    profile = probe(args.nvme_path, args.size_mb, args.emulate_cxl_gbps, args.nvme_backend)
    if args.config:
        profile["gpu"].update(_model_compute(cfg, args.config, lengths, profile))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Measured by `longtune probe` on {profile['measured']['date']}\n" + yaml.safe_dump(profile, sort_keys=False))
    for name, tier in profile["tiers"].items():
        extra = f", disk read {tier['read_gbps']} / write {tier['write_gbps']} GB/s ({tier['backend']})" if name == "nvme" else ""
        emulated = " (emulated)" if tier.get("emulated") else ""
        print(f"{name}{emulated}: {tier['capacity_gb']} GB, to GPU {tier['to_gpu_gbps']} GB/s, from GPU {tier['from_gpu_gbps']} GB/s{extra}")
    print(f"machine profile written to {out}; use it with memory.machine={out}")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    code = _main(argv)
    if code != EXIT_OK and "longtune.trainer.inputs" in sys.modules:  # a start that failed: no empty run folder
        from longtune.trainer.inputs import remove_created_run_folders

        remove_created_run_folders()
    return code


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from longtune.trainer.errors import ConfigError, RunError, Stopped

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    warnings.showwarning = _one_line_warning
    try:
        args = build_parser().parse_args(_flags_first(argv))
        args.argv = argv
        return run(args)
    except (ConfigError, UsageError) as e:
        return _fail(e, EXIT_USAGE, debug)
    except (RunError, FloatingPointError, OSError, _RanksFailed) as e:
        return _fail(e, EXIT_RUNTIME, debug)
    except Stopped as e:  # SIGTERM: the message says where the run stopped and what it saved
        if str(e) and _is_rank_zero():
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # a bug of ours or of a library (some raise BaseExceptions): still one line
        from longtune.trainer.errors import signal_behind

        if isinstance(signal_behind(e, 0), KeyboardInterrupt):  # Ctrl-C, and a collective broke on the way out
            return _interrupted()
        lost = _lost_rank(e)
        if lost:
            return _fail(lost, EXIT_RUNTIME, debug, e)
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
        return _fail(f"internal error{at}: {type(e).__name__}: {_first_line(e)} (rerun with --debug for the traceback)",
                     EXIT_RUNTIME, debug, e)


def _interrupted() -> int:
    """SIGINT: one line, from the launcher when there is one (every rank of its group got the signal too)."""
    from longtune.launch.distributed import launched_world

    if launched_world() == 1:
        on = f": nothing half-written is left; longtune resume {_RUN_DIR} goes on from its newest complete " \
            "checkpoint" if _RUN_DIR else ""
        print(f"error: interrupted (SIGINT){on}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _lost_rank(e: BaseException) -> Optional[str]:
    """A rank's collective that failed because a peer is gone, said as that (not an internal error)."""
    if "longtune.launch.distributed" not in sys.modules:  # no process group was joined
        return None
    from longtune.launch.distributed import collective_failure

    what = collective_failure(e)
    if what is None:
        return None
    on = f"longtune resume {_RUN_DIR}" if _RUN_DIR else "longtune resume"
    return f"{what}; {on} goes on from the newest complete checkpoint"


def _is_rank_zero() -> bool:
    """Rank 0 says why the group stopped on SIGTERM; the other ranks, stopped the same way, stay quiet."""
    return os.environ.get("RANK", "0") == "0"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _fail(message, code: int, debug: bool, error: Optional[BaseException] = None) -> int:
    error = error if error is not None else message
    if debug and isinstance(error, BaseException):
        traceback.print_exception(error)
    text = message if isinstance(message, str) else _first_line(message)
    if len(text) > MAX_ERROR_CHARS and not debug:  # a library's message can run on (every mismatched tensor...)
        text = text[:MAX_ERROR_CHARS].rstrip() + " ... (--debug shows the rest)"
    print(f"error: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
