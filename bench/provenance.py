"""Where a bench result came from: the commit it ran on, for the JSON in bench/results/."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """HEAD, marked "(dirty tree)" when anything but bench/results differs from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        # A bench run commonly writes its own results file: that alone does not make the code differ.
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!bench/results"],
                               capture_output=True, text=True, cwd=REPO).stdout.strip()
    except OSError:
        return None
    return (head + (" (dirty tree)" if dirty else "")) if head else None
