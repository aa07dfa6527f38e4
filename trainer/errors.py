"""The errors a user sees as one line: ConfigError (exit 2: what they gave is wrong), RunError (exit 1: what
happened while running) and Stopped (exit 143: SIGTERM), and how a training process stops on a signal. Nothing
here imports torch, so the CLI can report any of them before loading it."""

from __future__ import annotations

import signal


class ConfigError(ValueError):
    """A bad config, command line or input file the user gave; the CLI prints it as one line and exits 2."""


class RunError(RuntimeError):
    """A failure while running (a disk that fills, a file that breaks mid-run); one line, exit 1."""


class CheckpointError(RunError):
    """A checkpoint could not be written or read; the message says which and why."""


def full_disk_hint(error: BaseException) -> str:
    """' (free some space, or move run.output_dir)' after a write into the run folder that failed for space (a
    full disk, a quota, a file-size limit: errno, or the '(os error 28)' of a Rust library's message), else ''."""
    import errno

    full = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if getattr(error, "errno", None) in full or any(f"(os error {n})" in str(error) for n in full):
        return " (free some space, or move run.output_dir)"
    return ""


# --- stopping on a signal ------------------------------------------------------------------------------------
# SIGTERM is what a scheduler sends (SLURM at the end of a job's time, Kubernetes when it evicts a pod), SIGINT
# is Ctrl-C. A training process records both (install_stop_handlers). SIGINT stops at once (KeyboardInterrupt,
# exit 130). SIGTERM stops at once too (Stopped, exit 143), except once the training loop runs (defer_stop):
# there it only asks the loop to stop at the next step boundary, after saving a checkpoint.


class Stopped(BaseException):
    """The run stopped on SIGTERM; the CLI prints the message as one line and exits 128 + the signal's number.
    A BaseException like KeyboardInterrupt, so that no `except Exception` on the way turns it into a failure."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: list[int] = []  # the stop signals received, in order
_deferring = False


def _on_signal(signum: int, frame) -> None:
    _received.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    if not _deferring:
        raise Stopped(f"stopped by {signal.Signals(signum).name} before training started: no checkpoint written", signum)


def install_stop_handlers() -> None:
    """Record SIGTERM and SIGINT in this process (the main thread only: elsewhere signals cannot be handled)."""
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _on_signal)


def defer_stop() -> None:
    """From here on (the training loop starts) SIGTERM asks to stop at the next step boundary (stop_requested)
    instead of raising wherever the process happens to be. For the rest of the process: a SIGTERM after the loop
    ended (a launcher stopping the group once this rank failed) must not replace the error being reported, nor
    cut the last checkpoint short."""
    global _deferring
    _deferring = True


def stop_requested() -> bool:
    """A SIGTERM arrived (the loop stops at its next step boundary)."""
    return signal.SIGTERM in _received


def signals_received() -> int:
    """How many stop signals arrived so far: a mark to compare with after a library call (see signal_behind)."""
    return len(_received)


def signal_behind(error: BaseException, mark: int) -> BaseException | None:
    """The interrupt behind `error`, when a signal stopped the work that failed: a library that catches what a
    signal raised inside it (torch.save's zip writer: "unexpected pos") reports its own error instead.
    None when `error` is a failure of its own."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (KeyboardInterrupt, Stopped)):
            return seen
        seen = seen.__cause__ or seen.__context__
    new = _received[mark:]
    if signal.SIGINT in new:
        return KeyboardInterrupt()
    if signal.SIGTERM in new and not _deferring:
        return Stopped("stopped by SIGTERM", signal.SIGTERM)
    return None
