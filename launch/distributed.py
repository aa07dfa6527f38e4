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
