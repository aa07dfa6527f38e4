"""No process longtune starts or documents sees our top-level folders under their bare names (launch/isolation.py).

From the repo root, `import kernels` would find our kernels/ instead of the PyPI package transformers imports
(and `trainer`, `planner`... whatever a library may one day import). Every kind of process is started here
from the repo root, with a probe on its PYTHONPATH (a sitecustomize) that, at the moment the process first
imports transformers, writes where each bare name and `longtune.trainer` resolve (importlib.util.find_spec).
The processes are started as a user starts them: without the PYTHONSAFEPATH the tests' own children get, but
for the tests' own helper, whose environment is what is checked there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_env, make_tiny_config, run_cli, write_yaml

from longtune.launch.isolation import TOP_LEVEL

BIN = Path(sys.executable).parent  # the venv's console scripts: longtune, torchrun

PROBE = """
import json, os, sys

_done = []


def _probe(event, args):
    if event != "import" or args[0] != "transformers" or _done:
        return
    _done.append(1)
    import importlib.util

    def where(name):
        spec = importlib.util.find_spec(name)
        return None if spec is None else list(spec.submodule_search_locations or [spec.origin])

    report = {"argv": sys.argv, "sys_path": list(sys.path), "longtune.trainer": where("longtune.trainer")}
    report.update({name: where(name) for name in NAMES})
    with open(os.path.join(os.environ["ISOLATION_REPORTS"], f"{os.getpid()}.json"), "w") as f:
        json.dump(report, f)


sys.addaudithook(_probe)
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory, tokenizer_dir) -> Path:
    """One step of the tiny model, no evaluation: the processes' start-up is what is looked at."""
    folder = tmp_path_factory.mktemp("isolation")
    cfg = make_tiny_config(folder / "run", tokenizer_dir)
    cfg["train"].update(max_steps=1, warmup_steps=0)
    cfg["data"]["passkey"]["eval_samples"] = 0
    cfg["run"]["device"] = "cpu"  # two processes on a one-GPU machine too
    return write_yaml(folder / "config.yaml", cfg)


@pytest.fixture
def probe(tmp_path) -> tuple[dict, Path]:
    """(environment additions that load the probe, the folder its reports go to)."""
    site, reports = tmp_path / "probe", tmp_path / "reports"
    site.mkdir()
    reports.mkdir()
    (site / "sitecustomize.py").write_text(f"NAMES = {TOP_LEVEL!r}\n{PROBE}")
    return {"PYTHONPATH": str(site), "ISOLATION_REPORTS": str(reports), "TOKENIZERS_PARALLELISM": "false"}, reports


def _as_a_user(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return {**env, **extra}


def _reports(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def _from_repo(locations) -> bool:
    """A folder at the top of the repo (not, say, the site-packages of a venv kept inside it)."""
    return any(Path(p).resolve().parent == REPO for p in locations or ())


def _assert_isolated(reports: list[dict], processes: int, what: str) -> None:
    assert len(reports) >= processes, f"{what}: {len(reports)} process(es) imported transformers, expected {processes}"
    for r in reports:
        shadowing = {name: r[name] for name in TOP_LEVEL if _from_repo(r[name])}
        assert not shadowing, f"{what}: {r['argv']} sees the repo's folders under bare names: {shadowing}"
        assert _from_repo(r["longtune.trainer"]), (what, r["argv"], r["longtune.trainer"])
        assert r["kernels"] is None or "site-packages" in r["kernels"][0], r["kernels"]  # PyPI's, where installed


def _run(cmd: list, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_probe_sees_a_clash(probe):
    """The control: plain `python -c` from the repo root, as before the fix, does see our kernels/ (and
    transformers fails to import, or imports our folder in place of the package it needs)."""
    extra, reports = probe
    subprocess.run([sys.executable, "-c", "import transformers"], cwd=REPO, env=_as_a_user(extra), capture_output=True)
    (report,) = _reports(reports)
    assert _from_repo(report["kernels"]) and _from_repo(report["trainer"])


@pytest.mark.parametrize("launch", ["longtune train", "longtune train --nproc 2", "torchrun -m (README)", "ray 2 workers",
                                    "run_cli"])
def test_no_process_sees_the_repo_folders(launch, config, probe, tmp_path):
    extra, reports = probe
    out = f"run.output_dir={tmp_path / 'run'}"
    if launch == "longtune train":
        _run([BIN / "longtune", "train", config, out], _as_a_user(extra))
        _assert_isolated(_reports(reports), 1, launch)
    elif launch == "longtune train --nproc 2":
        _run([BIN / "longtune", "train", config, out, "--nproc", "2"], _as_a_user(extra))
        _assert_isolated(_reports(reports), 2, launch)
    elif launch == "torchrun -m (README)":
        _run([BIN / "torchrun", "--standalone", "--nproc-per-node", "2", "-m", "longtune.launch.torchrun", config, out],
             _as_a_user(extra))
        _assert_isolated(_reports(reports), 2, launch)
    elif launch == "ray 2 workers":  # a local cluster of its own, started in the repo root
        _run([BIN / "longtune", "train", config, out, "launch.backend=ray", "launch.ray.num_workers=2"],
             _as_a_user(extra))
        _assert_isolated([r for r in _reports(reports) if "default_worker.py" in r["argv"][0]], 2, launch)
    else:  # the tests' own helper, with the environment it gives every child
        result = run_cli("train", config, out, env=extra)
        assert result.returncode == 0, result.stderr[-3000:]
        assert cli_env()["PYTHONSAFEPATH"] == "1"
        _assert_isolated(_reports(reports), 1, launch)
