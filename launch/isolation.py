"""Keep a source checkout's top-level folders off `sys.path`, so that they are only ever `longtune.*`.

The repo keeps trainer/, offload/, planner/, kernels/, models/, launch/ and bench/ at its root and installs them as
`longtune.<folder>`. Under their bare names they shadow real packages: transformers imports the PyPI package
`kernels`, and from the repo root `import kernels` finds ours. A folder of the checkout reaches `sys.path`
three ways: Python puts the current folder first for `python -m` and `python -c` (and the script's folder for
`python script.py`); Ray puts its driver's folder first on every worker's path; and a user may name it in
PYTHONPATH. So, two tools, both used at process boundaries:

- `safe_env()`: the environment of every Python process longtune starts itself (bench probes, the tests'
  children): PYTHONSAFEPATH=1, with which Python (3.11+) adds no implicit folder; its children inherit it.
- `keep_checkout_off_sys_path()`: called first by every entry point that others start (the `longtune` command
  and `python -m longtune.launch.cli`, torchrun's ranks running `-m longtune.launch.torchrun` from wherever the
  user stands, Ray's workers, `python -m pytest` through the tests' conftest): drops every checkout folder from
  `sys.path` before anything that could import a clashing name is loaded.

Imports nothing of longtune and nothing heavy: it runs before everything else.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Optional

# The folders of the repo root that are packages of longtune (pyproject.toml maps each to longtune.<name>).
TOP_LEVEL = ("trainer", "offload", "planner", "kernels", "models", "launch", "bench")


def is_checkout(folder: str) -> bool:
    """A `sys.path` entry ('' is the current folder) that exposes longtune's folders under their bare names."""
    root = Path(folder or os.curdir)
    return all((root / name / "__init__.py").is_file() for name in TOP_LEVEL)


def keep_checkout_off_sys_path() -> None:
    """Drop every checkout folder from `sys.path`, as `python -P` would have. A bare name already imported from a
    checkout cannot be taken back: that is an error naming the way out."""
    sys.path[:] = [p for p in sys.path if not is_checkout(p)]
    shadowing = [name for name in TOP_LEVEL if _from_checkout(sys.modules.get(name))]
    if shadowing:
        raise ImportError(f"{', '.join(shadowing)} was imported from longtune's source folder under its bare name, "
                          "shadowing any package of that name (transformers imports the PyPI package `kernels`); "
                          "start Python with -P or PYTHONSAFEPATH=1, or from another folder")


def safe_env(env: Optional[Mapping[str, str]] = None, **extra: str) -> dict[str, str]:
    """`env` (default: this process's) for a Python child that must not see the folder it starts in."""
    return {**(os.environ if env is None else env), **extra, "PYTHONSAFEPATH": "1"}


def _from_checkout(module) -> bool:
    for folder in getattr(module, "__path__", None) or ():
        if is_checkout(str(Path(folder).parent)):
            return True
    return False
