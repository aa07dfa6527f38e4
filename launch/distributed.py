"""Joining the process group a launcher describes, and rank-aware output.

torchrun (and `longtune train --nproc N`, which runs it) sets RANK / WORLD_SIZE / MASTER_ADDR in the
environment: the group is set up from it (`env://`; a private tcp:// init hangs under torchrun, pytorch #191957).
Ray Train and accelerate set the group up themselves before our code runs: it is joined as it is.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta


def launched_world() -> int:
    """Processes the launcher started (1 when run directly)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def restarted() -> bool:
    """torchrun restarted the group after a failure (--max-restarts): the run continues from its checkpoint."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def die_with_parent() -> None:
    """A rank ends when the process that started it does (`longtune train --nproc` or torchrun killed with SIGKILL:
    an out-of-memory killer, a scheduler), instead of training on with no parent: Linux's parent-death signal.
    SIGKILL, since a rank may be blocked in a collective; its checkpoint writes are atomic. Elsewhere: nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call
        os.kill(os.getpid(), signal.SIGKILL)


def pass_sigterm_to_ranks(grace_s: float) -> "_SigtermToRanks":
    """In `longtune train --nproc N` (torchrun's agent runs in this process): SIGTERM, a scheduler's, goes on to the
    ranks, which save a checkpoint at their next step boundary and exit 143; the launcher waits up to grace_s
    (parallel.timeout_s) for them. torchrun's agent would wait its TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s) here and
    after a rank failed alike; that wait now only ends a group that already failed (a rank that stopped answering
    cannot take a signal), and is STOP_WAIT_S unless set."""
    import signal
    import threading

    stop = _SigtermToRanks(grace_s)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(STOP_WAIT_S))
    _shorten_stop_wait()
    if threading.current_thread() is threading.main_thread():
        for name in ("PET_SIGNALS_TO_HANDLE", "TORCHELASTIC_SIGNALS_TO_HANDLE"):  # torchrun's flag, its agent's
            os.environ.setdefault(name, "SIGINT,SIGHUP,SIGQUIT")  # SIGTERM is ours
        signal.signal(signal.SIGTERM, stop.handle)
    return stop


STOP_WAIT_S = 5  # how long torchrun's agent waits for the ranks of a failed group to end on SIGTERM, then SIGKILL


def _shorten_stop_wait() -> None:
    """torchrun's agent stops the ranks of a failed group with SIGTERM and waits 30 s before SIGKILL: where a rank
    fails, its process context closes the others with close()'s default wait, and the agent's _stop_workers with
    _shutdown()'s, both 30 s, not the shutdown_timeout it was configured with (torch 2.13). A rank that stopped
    answering (the reason the group failed, often) cannot take the SIGTERM, so each such failure ended 30 s late:
    torch's default is TORCH_ELASTIC_SHUTDOWN_TIMEOUT (STOP_WAIT_S unless set) instead."""
    try:
        from torch.distributed.elastic.multiprocessing.api import PContext
    except ImportError:
        return
    close = PContext.__dict__.get("close")
    if close is None or getattr(close, "longtune_wait", False):
        return

    def close_sooner(self, death_sig=None, timeout=30):
        if timeout == 30:  # torch's hard-coded default
            timeout = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", STOP_WAIT_S))
        return close(self, death_sig, timeout)

    close_sooner.longtune_wait = True
    PContext.close = close_sooner


class _SigtermToRanks:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.outcome: str | None = None  # what happened, once SIGTERM was handled ("" when rank 0 said it)

    def handle(self, signum, frame) -> None:
        import logging
        import signal
        import time

        from torch.distributed.elastic.multiprocessing import SignalException

        if self.outcome is not None:  # a second SIGTERM while the ranks stop
            return
        self.outcome = ""
        for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
            logging.getLogger(name).setLevel(logging.ERROR)  # its "shutting down workers" lines: ours says it
        ranks = _child_processes()
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and any(_exit_status(pid) is None for pid in ranks):
            time.sleep(0.05)
        late = [r for pid, r in ranks.items() if _exit_status(pid) is None]
        failed = [f"rank {r} exited with code {_exit_status(pid)}" for pid, r in ranks.items()
                  if _exit_status(pid) not in (None, 0, 128 + signal.SIGTERM)]
        if not ranks:
            self.outcome = "stopped by SIGTERM before the ranks started: nothing trained"
        elif late or failed:
            what = [*failed, *([f"rank(s) {', '.join(map(str, sorted(late)))} did not stop within {self.grace_s:g} s "
                                "(parallel.timeout_s) and were killed"] if late else [])]
            self.outcome = (f"stopped by SIGTERM: {'; '.join(what)}; longtune resume goes on from the newest complete "
                            "checkpoint")
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))

    def raise_if_stopped(self) -> None:
        if self.outcome is not None:
            from longtune.trainer.errors import Stopped

            raise Stopped(self.outcome)


def _child_processes() -> dict[int, int]:
    """{pid: rank} of this process's children (the ranks torchrun started here), from /proc."""
    out = {}
    for stat in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not stat.isdigit():
            continue
        try:
            with open(f"/proc/{stat}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            if int(fields[1]) != os.getpid():
                continue
            with open(f"/proc/{stat}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            out[int(stat)] = int(env.get(b"RANK", b"-1"))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _exit_status(pid: int) -> int | None:
    """A child's exit code (128 + N for signal N) once it has exited and before it is reaped; None while it
    runs. A child already reaped counts as exited (0)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0
    if fields[0] not in ("Z", "X"):
        return None
    status = int(fields[49]) if len(fields) > 49 else 0  # field 52: the exit status as waitpid reports it
    return (status >> 8) & 0xFF if status & 0x7F == 0 else 128 + (status & 0x7F)


_GROUP: dict = {}  # the group this process joined: world size and parallel.timeout_s, for collective_failure


def collective_failure(error: BaseException) -> str | None:
    """What a collective's failure means, in words, when a peer is gone: a process that exited (gloo: "Connection
    closed by peer"; the store: "Connection reset by peer"; NCCL: "remote process exited") or one that stopped
    answering (a collective past parallel.timeout_s). None for any other error, or without a group of several."""
    world, timeout_s = _GROUP.get("world", 1), _GROUP.get("timeout_s")
    if world <= 1:
        return None
    texts, seen = [], error
    while seen is not None:
        texts.append(f"{type(seen).__name__} {seen}".lower())
        seen = seen.__cause__ or seen.__context__
    text = " ".join(texts)
    distributed = any(t in text for t in ("disterror", "distbackenderror", "distnetworkerror", "diststoreerror",
                                          "gloo", "nccl", "c10d", "processgroup"))
    if not distributed:
        return None
    if any(t in text for t in ("connection closed by peer", "connection reset by peer", "broken pipe",
                               "remote process exited", "socket closed")):
        return ("a peer process exited in the middle of a collective (the launcher's line says which rank and "
                "how)")
    if any(t in text for t in ("timed out", "timeout")):
        peer = f"rank {1 - _GROUP['rank']}" if world == 2 else "a rank"
        waited = f"parallel.timeout_s={timeout_s:g}" if timeout_s is not None else "parallel.timeout_s"
        return (f"{peer} stopped answering: a collective waited {waited} seconds for it (a hung or stopped process, "
                "or one far slower than the others)")
    return None


def init_process_group(timeout_s: float, alone: bool = False, device: str = "auto") -> None:
    """Join the launcher's group (gloo on the CPU, NCCL on GPUs: run.device); every collective times out after
    timeout_s, so a lost rank fails the others instead of hanging them. `alone`: a group of this one process
    (FSDP2 and DeepSpeed need a group even on one GPU), on a free port of 127.0.0.1."""
    import torch
    import torch.distributed as dist

    from longtune.trainer.errors import ConfigError
    from longtune.trainer.ranks import device_type, gpus_short

    if dist.is_initialized() or (launched_world() <= 1 and not alone):
        return
    if launched_world() <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        # Run directly: a group of one on a private port. Under torchrun (--nproc 1) the group's store is the agent's,
        # at torchrun's MASTER_PORT: moving the port made the rank wait for a store nobody serves (a hang).
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    try:
        kind = device_type(device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if kind == "cuda":
        short = gpus_short(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count())
        if short:  # started by a launcher other than ours (`longtune train --nproc` refuses this up front)
            raise ConfigError(short)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    _GROUP.update(world=dist.get_world_size(), rank=dist.get_rank(), timeout_s=timeout_s)


def prefix_output(rank: int, world: int) -> None:
    """Every line says which rank wrote it; ranks other than 0 keep their warnings and errors (stderr) and drop
    the progress that rank 0 already prints."""
    if world <= 1:
        return
    tag = f"[rank {rank}] "
    sys.stderr = _Prefixed(sys.stderr, tag)
    sys.stdout = _Prefixed(sys.stdout, tag) if rank == 0 else _Prefixed(open(os.devnull, "w"), tag)


class _Prefixed:
    """A text stream that starts every line with a tag."""

    def __init__(self, stream, tag: str):
        self._stream, self._tag, self._at_line_start = stream, tag, True

    def write(self, text: str) -> int:
        out = []
        for line in text.splitlines(keepends=True):
            out.append((self._tag if self._at_line_start else "") + line)
            self._at_line_start = line.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)
