"""No traceback, nothing silent (issue 27): what goes wrong around a run is one line naming what and where, with
the right exit code. Damaged torch distributed checkpoints, a full disk during an FSDP2 or ZeRO-2 checkpoint write,
under TensorBoard, the run's tokenizer copy or the NVMe tier, a resume that would change what the data position
counts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from conftest import REPO, SMOLLM2_GGUF, cli_env, write_yaml

FAULT_HOOK = REPO / "tests" / "fault_hook"


def _cli(*args, fault: dict | None = None) -> subprocess.Popen:
    """`longtune ARGS` started, with the fault hook on when `fault` is given (tests/fault_hook)."""
    env = cli_env()
    if fault:
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(FAULT_HOOK), env.get("PYTHONPATH")])),
                   LONGTUNE_TEST_FAULT=json.dumps(fault))
    return subprocess.Popen([sys.executable, "-m", "longtune.launch.cli", *map(str, args)], cwd=REPO, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line or "Traceback" in line]


def test_a_damaged_or_unwritable_distributed_checkpoint_is_one_line(tmp_path, tiny_config):
    """FSDP2 in one process writes a torch distributed checkpoint (dcp/); the disk fills during the second one.
    torch reports both a damaged checkpoint and a failed write as a CheckpointException, a BaseException that
    used to pass every handler as a traceback."""
    run = tmp_path / "run"
    cfg = tiny_config
    cfg["train"]["max_steps"] = 2
    cfg["data"]["passkey"]["eval_samples"] = 0
    cfg["checkpoint"].update(every_n_steps=1)
    cfg["parallel"] = {"strategy": "fsdp2"}
    cfg["run"].update(output_dir=str(run), device="cpu")
    # step_1's dcp/ holds ~38 MB: the disk is full in the middle of step_2's
    full = _cli("train", write_yaml(tmp_path / "fsdp2.yaml", cfg), fault={"file": ".distcp", "after": 50e6,
                                                                        "fault": "ENOSPC"})
    _, err = full.communicate(timeout=600)
    assert full.returncode == 1, err[-3000:]
    # (torch.save's zip writer reports the short write as "unexpected pos N vs M")
    assert _errors(err) == [f"error: could not write checkpoint {run}/step_2: the disk is full: torch.save could not "
                            f"write the whole file (free some space under {run}, or move run.output_dir)"], err[-3000:]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".", "step_"))) == ["step_1"]

    damaged = {}
    for name, damage in {"missing": lambda dcp: (dcp / "__0_0.distcp").unlink(),
                         "truncated": lambda dcp: os.truncate(dcp / ".metadata", 100)}.items():
        shutil.copytree(run, tmp_path / name)
        damage(tmp_path / name / "step_1" / "dcp")
        damaged[name] = _cli("export", tmp_path / name, "--out", tmp_path / f"{name}-export")
    for name, proc in damaged.items():
        _, err = proc.communicate(timeout=600)
        cause = {"missing": "dcp/__0_0.distcp is missing",
                 "truncated": "dcp/.metadata is damaged (UnpicklingError: pickle data was truncated)"}[name]
        assert proc.returncode == 1 and _errors(err) == [
            f"error: checkpoint {tmp_path / name}/step_1 is unreadable: {cause}"], err[-3000:]
        assert not (tmp_path / f"{name}-export").exists()


def test_a_full_disk_during_a_zero2_checkpoint_write_is_one_line(tmp_path, tiny_config):
    """ZeRO-2 (in one process, the CPU config of tests/test_parallel.py: no DeepSpeed op is built; 2 ranks give each
    rank this line). DeepSpeed writes its files with torch.save(path), whose C++ zip writer opens them itself (out of
    the fault hook's reach) and reports a short write as "unexpected pos N vs M", which a full disk read as. A
    file-size limit (RLIMIT_FSIZE) cuts the optimizer-state file short as a full disk does: one line saying the disk
    is full, no traceback, nothing half-written left."""
    import resource

    run = tmp_path / "run"
    cfg = tiny_config
    cfg["train"]["max_steps"] = 1
    cfg["data"]["passkey"]["eval_samples"] = 0
    cfg["checkpoint"].update(every_n_steps=1)
    cfg["parallel"] = {"strategy": "deepspeed", "zero_stage": 2}
    cfg["run"].update(output_dir=str(run), device="cpu")
    # above every other file the run writes (the tokenizer's 3.5 MB, the 12.6 MB of weights), below the 38 MB of
    # fp32 master weights and Adam moments
    limit = 20 << 20
    result = subprocess.run([sys.executable, "-m", "longtune.launch.cli", "train",
                             str(write_yaml(tmp_path / "zero2.yaml", cfg))], cwd=REPO, env=cli_env(),
                            capture_output=True, text=True, timeout=600,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode == 1, result.stderr[-3000:]
    assert _errors(result.stderr) == [
        f"error: could not write checkpoint {run}/step_1: the disk is full: torch.save could not write the whole file "
        f"(free some space under {run}, or move run.output_dir)"], result.stderr[-3000:]
    assert not [p.name for p in run.iterdir() if p.name.startswith((".", "step_"))]


def test_a_resume_on_fewer_ranks_says_how_the_global_batch_changes_and_how_to_keep_it(tiny_config):
    from longtune.trainer.config import validate
    from longtune.trainer.train import global_batch_note

    saved = {"train": {"micro_batch_size": 1, "grad_accum_steps": 2}, "data": {"seq_len": 128}}
    cfg = validate(tiny_config)  # seq_len 128, grad_accum_steps 1
    assert global_batch_note(saved, cfg, 2, 1) == (
        "resuming a run of 2 process(es) on 1: the global batch changes from 512 to 128 tokens per step (to keep it, "
        "resume with train.grad_accum_steps=4); the data order goes on from the same global position")
    assert global_batch_note(saved, cfg, 3, 2).endswith(
        "from 768 to 256 tokens per step (to keep it, resume with train.grad_accum_steps=3); the data order goes on "
        "from the same global position")
    assert "no whole train.grad_accum_steps keeps it on 4 process(es)" in global_batch_note(saved, cfg, 3, 4)
    cfg.train.grad_accum_steps = 4
    assert global_batch_note(saved, cfg, 2, 1) is None  # kept
    assert global_batch_note({}, cfg, 2, 1) is None  # nothing to compare with


def test_a_lost_or_hung_rank_is_named_and_the_launcher_ends_the_group_in_seconds(monkeypatch):
    """The errors a rank sees when its peer is gone (torch 2.13 on gloo, as the ranks reported them: the autograd
    engine re-raises a DDP hook's failure as a RuntimeError) say so, not "internal error"; torchrun's agent waits
    5 s, not 30, for a failed group's other ranks to end on SIGTERM (a stopped rank never does)."""
    import signal
    from types import SimpleNamespace

    from torch.distributed import DistBackendError, DistNetworkError
    from torch.distributed.elastic.multiprocessing.api import PContext

    from longtune.launch import cli, distributed

    gloo = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/"
    killed = RuntimeError(f"{gloo}pair.cc:553] Connection closed by peer [127.0.0.1]:48268. This is typically caused "
                          "by a remote worker crashing. Check the logs of the remote worker before reporting an error.")
    hung = RuntimeError(f"{gloo}unbound_buffer.cc:78] Timed out waiting 30000ms for recv operation to complete")
    store = DistNetworkError("failed to recv, got 0 bytes: Connection reset by peer")
    backend = DistBackendError(f"{gloo}unbound_buffer.cc:133] Timed out waiting 30000ms for send operation")
    monkeypatch.setattr(distributed, "_GROUP", {"world": 2, "rank": 0, "timeout_s": 30.0})
    monkeypatch.setattr(cli, "_RUN_DIR", "runs/x")
    exited = ("a peer process exited in the middle of a collective (the launcher's line says which rank and how); "
              "longtune resume runs/x goes on from the newest complete checkpoint")
    stopped = ("rank 1 stopped answering: a collective waited parallel.timeout_s=30 seconds for it (a hung or stopped "
               "process, or one far slower than the others); longtune resume runs/x goes on from the newest complete "
               "checkpoint")
    assert [cli._lost_rank(e) for e in (killed, store, hung, backend)] == [exited, exited, stopped, stopped]
    assert cli._lost_rank(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    monkeypatch.setattr(distributed, "_GROUP", {})  # one process, no group: a bug stays an internal error
    assert cli._lost_rank(killed) is None

    monkeypatch.setattr(PContext, "close", PContext.close)  # put back after the test
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    distributed._shorten_stop_wait()
    waits = []
    context = SimpleNamespace(_close=lambda death_sig, timeout: waits.append(timeout), _tail_logs=[],
                              filtered_stdout=None, filtered_stderr=None)
    PContext.close(context)  # a rank failed: the others are stopped with close()
    PContext.close(context, signal.SIGTERM, 30)  # the agent's _stop_workers -> _shutdown(), its 30 s default
    PContext.close(context, signal.SIGTERM, 120)  # a wait the user configured stays
    assert waits == [5, 5, 120]


def test_nothing_silent_at_the_command_line(tmp_path, tiny_config, capsys, monkeypatch):
    """What used to pass without a word: bench arguments that ran the whole suite wrongly (or crashed, or failed at
    the end), --nproc beyond the CPU cores, an empty run folder left by a start that failed, a resume override that
    was recorded but not trained."""
    import signal

    from longtune.launch.cli import main

    def cli(*args) -> tuple[int, list[str]]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, err.splitlines()

    for args, message in [
        (["--systems", ""], "--systems: '' not in the smoke suite (longtune, hf)"),
        (["--systems", "hf,"], "--systems: '' not in the smoke suite (longtune, hf)"),
        (["--cap-gb", "0"], "--cap-gb must be a positive number of GB, got 0"),
        (["--cap-gb", "-1"], "--cap-gb must be a positive number of GB, got -1"),
        (["--cap-gb", "nan"], "--cap-gb must be a positive number of GB, got nan"),
        (["--cap-gb", "2"], "--cap-gb 2 leaves longtune's plan nothing: it keeps 1 GB of the cap for its libraries and "
                            "1.5 GB as its host tier; give more than 2.5, or --systems without longtune"),
        (["--out", tmp_path], f"--out {tmp_path} is a folder; give the JSON file to write, e.g. {tmp_path}/bench.json"),
        (["--out", tmp_path / "file" / "x.json"], f"--out {tmp_path}/file/x.json: {tmp_path}/file is a file, not a "
                                                  "folder"),
    ]:
        (tmp_path / "file").write_text("")
        assert cli("bench", "smoke", *args) == (2, [f"error: {message}"]), args

    # --nproc beyond the cores (the launch then stops at a usage error of its own, before any rank starts)
    cores = len(os.sched_getaffinity(0))
    config = write_yaml(tmp_path / "tiny.yaml", {**tiny_config, "run": {"output_dir": str(tmp_path / "new" / "run")}})
    code, err = cli("train", config, "--nproc", cores + 1, "--nnodes", "2")
    assert code == 2 and err == [
        f"warning: --nproc {cores + 1} on {cores} CPU core(s): the ranks share them, each step waits for the slowest, "
        f"and the run is slower than with --nproc {cores} (run.device=cpu)",
        "error: --nnodes over 1 needs --rdzv-endpoint HOST:PORT (the same on every machine)"]
    assert not (tmp_path / "new").exists()  # the run folder (and its parent) it made, empty, are gone

    # a start that fails once the run folder is made (here: a vocabulary that the tokenizer does not fit in)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code, err = cli("train", config, "model.config.vocab_size=100", "train.max_steps=1")
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert code == 2 and err[-1].startswith("error: the tokenizer has 49,152 tokens but the model's vocab_size is 100")
    assert not (tmp_path / "new").exists()

    # overrides a resume cannot carry out: refused, naming the key, what the run has and why (after the checks of
    # the values themselves)
    run = tmp_path / "run"
    run.mkdir()
    write_yaml(run / "config.resolved.yaml", {**tiny_config, "run": {"output_dir": str(run)}})
    advice = f"start a new run for it (from this run's weights: longtune export {run} --out DIR, then model.path=DIR)"
    assert cli("resume", run, "model.config.num_hidden_layers=4") == (2, [
        f"error: longtune resume: model.config.num_hidden_layers=4 cannot change in a resumed run ({run} has "
        "model.config.num_hidden_layers=2; its checkpoint holds the model as it was, and the model is rebuilt from "
        f"it): {advice}"])
    assert cli("resume", run, f"model.tokenizer={SMOLLM2_GGUF}") == (2, [
        f"error: longtune resume: model.tokenizer={SMOLLM2_GGUF} cannot change in a resumed run ({run} has "
        f"model.tokenizer={tiny_config['model']['tokenizer']}; its checkpoint holds the model as it was, and the "
        f"model is rebuilt from it): {advice}"])

    # ... and so are the data settings a checkpoint's data position counts in: which source (data.kind), and for
    # data read from files which documents and how they are cut into samples, and the seed of their order; through
    # `longtune resume` (before anything loads) and `longtune train ... run.resume` (before the model is built)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a document of a few words"}\n')
    why = "and the data position it saved counts samples of that data, in that order"
    assert cli("resume", run, "data.kind=jsonl", f"data.path={data}") == (2, [
        f"error: longtune resume: data.kind=jsonl cannot change in a resumed run ({run} has data.kind=passkey, {why}): "
        f"{advice}"])
    files = tmp_path / "files"
    (files / "step_1").mkdir(parents=True)
    cfg = {**tiny_config, "data": {"kind": "jsonl", "path": str(data), "seq_len": 128}, "run": {"output_dir": str(files)}}
    for folder in (files, files / "step_1"):
        write_yaml(folder / "config.resolved.yaml", cfg)
    (files / "step_1" / "COMPLETE").write_text("")
    advice = advice.replace(str(run), str(files))
    for override, was in [("data.seq_len=256", "128"), ("data.packing=false", "True"), ("train.seed=7", "0"),
                          ("data.text_field=body", "text"), ("data.kind=passkey", "jsonl")]:
        key, _, value = override.partition("=")
        value = {"false": "False"}.get(value, value)
        assert cli("resume", files, override) == (2, [
            f"error: longtune resume: {key}={value} cannot change in a resumed run ({files} has {key}={was}, {why}): "
            f"{advice}"]), override
    try:
        code, err = cli("train", write_yaml(tmp_path / "files.yaml", cfg), "train.seed=7", "run.resume=auto")
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert (code, err[-1:]) == (2, [
        f"error: train.seed=7 cannot change in a resumed run (checkpoint {files}/step_1 was written with train.seed=0, "
        f"{why}): {advice}"])
    assert sorted(p.name for p in files.iterdir()) == ["config.resolved.yaml", "step_1"]  # nothing written, no lock

    from longtune.trainer.config import validate
    from longtune.trainer.inputs import data_position_change

    # a passkey sample is made from its index alone: sample N at another length (or seed) is still sample N
    passkey = validate(tiny_config).model_dump()
    assert data_position_change(passkey, validate({**tiny_config, "data": {**tiny_config["data"], "seq_len": 256},
                                                   "train": {**tiny_config["train"], "seed": 3}})) is None
    chat = validate({**tiny_config, "data": {"kind": "chat", "path": str(data)}})
    changed = validate({**tiny_config, "data": {"kind": "chat", "path": str(data), "chat": {"too_long": "drop"}}})
    assert data_position_change(chat.model_dump(), changed) == ("data.chat.too_long", "error", "drop")
    older = chat.model_dump()
    del older["data"]["chat"]["too_long"]  # a checkpoint written before the key existed: not compared
    assert data_position_change(older, changed) is None


def test_a_full_nvme_tier_names_the_file_and_what_was_being_written(tmp_path, monkeypatch):
    """The NVMe tier's files hold the optimizer state, streamed weights and offloaded activations of the memory
    runtime's parts, under keys of their own: a write the disk cannot take says which file, and what it held."""
    import errno

    import pytest
    import torch

    from longtune.offload import nvme

    def full(fd, size):  # what posix_fallocate says on a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nvme, "_preallocate", full)
    with nvme.NvmeStore(tmp_path / "nvme", backend="threads", direct="off") as store:
        for key, what in [("adamw-3", "the optimizer state of decoder layer 2"),
                          ("adamw-0", "the optimizer state of the embeddings, final norm and LM head"),
                          ("weights-1", "the weights of decoder layer 0"),
                          ("activations-2", "the offloaded activations of decoder layer 2"),
                          ("w", None)]:
            with pytest.raises(nvme.NvmeError) as info:
                store.write(key, torch.zeros(1000))
            message = str(info.value)
            assert re.fullmatch(
                rf"disk full at {tmp_path}/nvme: needed 4096 bytes, \d+ free, writing "
                rf"{re.escape(what + ' (' if what else '')}key '{key}'{re.escape(')' if what else '')} to the NVMe "
                rf"tier's file {store.path}/\.{key}-[0-9a-f]{{8}}\.swp\.\d+\.tmp \(free some space there, or give the "
                rf"NVMe tier another drive: memory.nvme_path\)", message), message
        monkeypatch.setattr(nvme, "_preallocate", lambda fd, size: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
        with pytest.raises(nvme.NvmeError, match=r"^writing the weights of decoder layer 3 \(key 'weights-4'\) failed at "
                                                 r".*\.tmp \(the NVMe tier\): Input/output error$"):
            store.write("weights-4", torch.zeros(10))


def test_a_full_disk_under_tensorboard_or_the_tokenizer_copy_is_one_line_naming_the_file(tmp_path, monkeypatch,
                                                                                        tokenizer_dir, capfd):
    """TensorBoard writes its events in a thread of its own, which printed the failure as a traceback before the
    next add_scalar raised the bare `[Errno 28] No space left on device`; the run's tokenizer copy failed the same
    bare way. Each is one RunError naming the file (and nothing on stderr); a logger whose writes failed closes
    quietly."""
    import errno

    import pytest
    from tensorboard.compat.tensorflow_stub.io import gfile

    from longtune.trainer.errors import RunError
    from longtune.trainer.metrics import MetricsLogger
    from longtune.trainer.train import _save_run_tokenizer

    def full(self, filename, file_content, binary_mode=False):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    logger = MetricsLogger(tmp_path, ["tensorboard"], 10)
    logger.log(1, {"loss": 1.0})
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    monkeypatch.setattr(gfile.LocalFileSystem, "append", full)
    expected = (rf"^could not write the TensorBoard events file {events} \(log.sinks: tensorboard\): No space left "
                r"on device \(free some space, or move run.output_dir\)$")
    with pytest.raises(RunError, match=expected):
        for step in range(2, 5):  # the writer thread's failure reaches the next call that checks on it
            logger.log(step, {"loss": 1.0})
    logger.close()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    monkeypatch.setattr(tokenizer, "save_pretrained", lambda folder: (
        (folder / "tokenizer_config.json").parent.mkdir(parents=True),
        (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))))
    with pytest.raises(RunError, match=rf"^could not write the run's tokenizer copy {tmp_path}/tokenizer: No space "
                                       r"left on device \(free some space, or move run.output_dir\)$"):
        _save_run_tokenizer(tokenizer, tmp_path / "tokenizer")
    assert not (tmp_path / "tokenizer").exists()  # none of it is left
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Exception in thread" not in err, err
