"""The errors a user sees as one line: ConfigError (exit 2: what they gave is wrong) and RunError (exit 1: what
happened while running). Nothing here imports torch, so the CLI can report either before loading it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config, command line or input file the user gave; the CLI prints it as one line and exits 2."""


class RunError(RuntimeError):
    """A failure while running (a disk that fills, a file that breaks mid-run); one line, exit 1."""


class CheckpointError(RunError):
    """A checkpoint could not be written or read; the message says which and why."""
