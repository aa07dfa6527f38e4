"""Every Triton kernel variant the launchers can choose, compiled for the GPUs users have, on a machine without one.

    python -m longtune.kernels.aot                  # one row per launcher choice and GPU target
    python -m longtune.kernels.aot --table          # one row per compiled variant and target
    python -m longtune.kernels.aot --summary        # one row per kernel and target
    python -m longtune.kernels.aot --json out.json  # everything, as JSON

It exits 1 when any variant fails a check (the failures on stderr), 2 where nothing can be compiled.

Triton's compiler and the ptxas it bundles build sm_80 (A100) and sm_90 (H100, H200) machine code without a
GPU. This module lists the kernel launches longtune makes at the sizes that matter (Llama-3-8B and -70B
widths, vocabulary 128,256, up to 1M tokens per sequence, bf16 / fp16 / fp32), by calling each launcher's own
argument builder (`_ce_launch`, `_forward_launch`, ...: the code the real launch runs) on meta tensors. Triton's
own binder then specialises the arguments as a launch does (an int becomes i64 past 2**31 - 1, a constexpr when
it is 1, gets divisibility 16 when it is a multiple of 16; pointers by dtype and alignment); equal
specialisations are one variant, compiled once per target. Each variant is checked:

- compiled: the whole pipeline ran, down to the cubin;
- spills: ptxas (the log of the very run that built the cubin) reports 0 bytes of spill stores and loads;
- shared memory: Triton's dynamic shared memory fits the target's per-block opt-in limit (Triton refuses to
  launch past it, at the first launch);
- registers: registers x threads fit the register file (else the launch fails: "too many resources");
- 64-bit offsets: wherever a pointer argument's tensor spans 2**31 elements or more at these sizes, no offset
  added to it was computed by i32 arithmetic on run-time values (see `offset_violations`);
- grid: the launch grid fits CUDA's limits (x < 2**31, y and z <= 65535).

Nothing of the rest of longtune is imported. Needs triton with its NVIDIA backend, without TRITON_INTERPRET=1
(under the interpreter `triton.jit` gives functions that cannot be compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Iterable, Optional

import torch

# ----------------------------------------------------------------------------------------------------------------
# What is compiled for
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    arch: int  # compute capability, 80 or 90
    gpus: str
    # cudaDevAttrMaxSharedMemoryPerBlockOptin, what Triton compares `metadata.shared` with before a launch. Source:
    # CUDA C++ Programming Guide, "Technical Specifications per Compute Capability", maximum shared memory per
    # thread block: 163 KB for 8.0, 227 KB for 9.0 (also the A100 and Hopper tuning guides); 1 KB = 1024 bytes.
    shared_limit: int
    # Streaming multiprocessors of the GPUs of this target: the RMSNorm backward launches one program per SM.
    sm_counts: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"sm_{self.arch}"


TARGETS = {
    80: Target(80, "A100 (108 SMs)", 163 * 1024, (108,)),
    90: Target(90, "H100 SXM / H200 (132 SMs), H100 PCIe (114 SMs)", 227 * 1024, (132, 114)),
}
# Same guide, same table, for both 8.0 and 9.0: 64K 32-bit registers per SM and per thread block, at most 255 per
# thread; registers are allocated per warp in units of 256 (CUDA occupancy calculator, "register allocation unit").
REGISTER_FILE = 65536
REGISTER_UNIT = 256
MAX_THREADS = 1024
GRID_LIMITS = (2**31 - 1, 65535, 65535)
INT32_ELEMENTS = 2**31  # an i32 element offset reaches 2**31 - 1: a tensor spanning more needs 64-bit offsets


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


MODELS = (
    Model("8B", 4096, 14336, 32, 8, 128, 128256),  # Llama-3-8B (config.json of meta-llama/Meta-Llama-3-8B)
    Model("70B", 8192, 28672, 64, 8, 128, 128256),  # Llama-3-70B
)
# Tokens per sequence (batch 1, the long-context case): a short run, 128K, 1M, and an odd length (no
# divisibility by 16: other specialisations of the lengths and row counts the kernels get).
TOKENS = (4096, 131072, 1 << 20, (1 << 20) - 1)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GALORE_RANK = 128  # GaloreOptions' default rank
# A loss chunk a user may ask for (model.kernels.ce_chunk_tokens has no upper bound): 32K x 128,256 fp32 logits are
# 16.8 GB and 4.2e9 elements, past 2**31 (the default chunk stays at or under 4096 tokens, 5.3e8 elements).
CE_CHUNK_ASKED = 32768
RMS_EPS = 1e-5  # Llama-3's rms_norm_eps

_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32"}


def _tokens(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n % 1024 == 0:
        return f"{n >> 10}K"
    return str(n)


# ----------------------------------------------------------------------------------------------------------------
# The launches
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One launch as a launcher makes it: the kernel, its grid, arguments (meta tensors) and keyword arguments."""
    kernel: str  # the name shown: the kernel function's
    fn: Any  # the triton.jit function
    grid: tuple
    args: tuple
    kwargs: dict
    dtype: str  # the data type the launch is about (the model's, or the logits' for the loss)
    at: str  # where it comes from: "70B 1M", "8B 4K k_proj"...
    targets: Optional[tuple[int, ...]] = None  # None: every target


def _meta(*shape: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def llama_launches(targets: Iterable[Target]) -> list[Launch]:
    """Every launch the kernels' launchers make at the Llama-3 sizes, built by the launchers' own code."""
    from . import fused_ce, galore_update, rmsnorm, rope, swiglu
    from .chunking import default_chunk_size

    targets = list(targets)
    out: list[Launch] = []
    for m in MODELS:
        for t in TOKENS:
            at = f"{m.name} {_tokens(t)}"
            # Fused loss: hidden[:, :-1] (t - 1 tokens) in chunks of the default size, or of a size asked for;
            # logits fp32 (accum_dtype), labels int64.
            n = t - 1
            for chunk, why in ((default_chunk_size(n, m.hidden, m.vocab), "default chunk"),
                               (min(n, CE_CHUNK_ASKED), "ce_chunk_tokens")):
                logits = _meta(chunk, m.vocab, dtype=torch.float32)
                labels, loss = _meta(chunk, dtype=torch.int64), _meta(chunk, dtype=torch.float32)
                for grad in (True, False):
                    grid, args, kw = fused_ce._ce_launch(logits, labels, loss, -100, 1.0 / n, grad)
                    out.append(Launch("_ce_chunk_kernel", fused_ce._ce_chunk_kernel, grid, args, kw, "fp32",
                                      f"{at} {why} ({chunk})"))
            for dt in DTYPES:
                d = _SHORT[dt]
                # RMSNorm over [tokens, hidden], Llama's casts (offset 0).
                x, w = _meta(t, m.hidden, dtype=dt), _meta(m.hidden, dtype=dt)
                y, rstd, grid, args, kw = rmsnorm._forward_launch(x, w, RMS_EPS, 0.0)
                out.append(Launch("_rms_norm_fwd_kernel", rmsnorm._rms_norm_fwd_kernel, grid, args, kw, d, at))
                for target in targets:
                    for sms in target.sm_counts:
                        n_prog = rmsnorm.backward_programs(sms, t)
                        *_, grid, args, kw = rmsnorm._backward_launch(_meta(t, m.hidden, dtype=dt), x, w, rstd,
                                                                      0.0, n_prog)
                        out.append(Launch("_rms_norm_bwd_kernel", rmsnorm._rms_norm_bwd_kernel, grid, args, kw, d,
                                          f"{at} {sms} SMs", (target.arch,)))
                # RoPE: q, k as transformers makes them (x_proj(x).view(b, s, h, d).transpose(1, 2)), cos/sin
                # [b, s, d] in q's dtype (transformers casts them). The gradients come back in that layout or
                # contiguous [b, h, s, d], whatever the attention backward produced.
                def qk(layout: str):
                    if layout == "bshd":
                        return (_meta(1, t, m.heads, m.head_dim, dtype=dt).transpose(1, 2),
                                _meta(1, t, m.kv_heads, m.head_dim, dtype=dt).transpose(1, 2))
                    return _meta(1, m.heads, t, m.head_dim, dtype=dt), _meta(1, m.kv_heads, t, m.head_dim, dtype=dt)

                cos, sin = _meta(1, t, m.head_dim, dtype=dt), _meta(1, t, m.head_dim, dtype=dt)
                for backward, layout in ((False, "bshd"), (True, "bshd"), (True, "bhsd")):
                    q, k = qk(layout)
                    *_, grid, args, kw = rope._rope_launch_args(q, k, cos, sin, 1, backward, dt, dt)
                    out.append(Launch("_rope_kernel", rope._rope_kernel, grid, args, kw, d, f"{at} q/k {layout}"))
                if dt != torch.float32:
                    # Under autocast: q, k in dt, cos/sin fp32 (the residual stream's dtype), so the output is
                    # fp32 (the reference's type promotion); the backward takes fp32 gradients back to dt.
                    q, k = qk("bshd")
                    c32 = s32 = _meta(1, t, m.head_dim, dtype=torch.float32)
                    qo, ko, grid, args, kw = rope._rope_launch_args(q, k, c32, s32, 1, False, torch.float32,
                                                                     torch.float32)
                    out.append(Launch("_rope_kernel", rope._rope_kernel, grid, args, kw, f"{d}>fp32",
                                      f"{at} autocast"))
                    *_, grid, args, kw = rope._rope_launch_args(qo, ko, c32, s32, 1, True, dt, dt)
                    out.append(Launch("_rope_kernel", rope._rope_kernel, grid, args, kw, f"fp32>{d}",
                                      f"{at} autocast"))
                # SwiGLU over gate/up [1, tokens, intermediate].
                g, u = _meta(1, t, m.intermediate, dtype=dt), _meta(1, t, m.intermediate, dtype=dt)
                grid, args, kw = swiglu._forward_launch(g, u, torch.empty_like(g))
                out.append(Launch("_swiglu_fwd_kernel", swiglu._swiglu_fwd_kernel, grid, args, kw, d, at))
                grid, args, kw = swiglu._backward_launch(torch.empty_like(g), g, u, torch.empty_like(g),
                                                         torch.empty_like(u))
                out.append(Launch("_swiglu_bwd_kernel", swiglu._swiglu_bwd_kernel, grid, args, kw, d, at))
        # GaLore's fused update, per projection weight of a decoder layer: the moments and the basis in the
        # weight's dtype (GaloreAdamW keeps them so), rank 128. Both sides for every shape: offload/galore.py picks
        # the side (rows >= cols: "right"), and the kernels may not ask it; the variants are the same either way.
        q_out, kv_out = m.heads * m.head_dim, m.kv_heads * m.head_dim
        shapes = {"q_proj/o_proj": (q_out, m.hidden), "k_proj/v_proj": (kv_out, m.hidden),
                  "gate_proj/up_proj": (m.intermediate, m.hidden), "down_proj": (m.hidden, m.intermediate)}
        for proj, (rows, cols) in shapes.items():
            r = min(GALORE_RANK, rows, cols)
            for dt in DTYPES:
                for side in ("right", "left"):
                    moments = (rows, r) if side == "right" else (r, cols)
                    basis = (r, cols) if side == "right" else (rows, r)
                    grid, args, kw = galore_update._launch(
                        _meta(rows, cols, dtype=dt), _meta(*moments, dtype=dt), _meta(*moments, dtype=dt),
                        _meta(*basis, dtype=dt), side, 1e-4, 0.25, 1e-8, 0.0)
                    out.append(Launch("_galore_update_kernel", galore_update._galore_update_kernel, grid, args, kw,
                                      _SHORT[dt], f"{m.name} {proj} {side}"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Specialisation: what a launch compiles, as Triton's own launch path computes it
# ----------------------------------------------------------------------------------------------------------------


def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


def specialize(fn, args: tuple, kwargs: dict, arch: int):
    """(signature, constexprs, attrs, options) of fn launched with these arguments on `arch`: Triton's binder and
    JITFunction._pack_args, as JITFunction.run calls them (checked against Triton 3.6 and 3.9)."""
    from triton import knobs
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} is not a compilable triton.jit function "
                           "(TRITON_INTERPRET=1 makes interpreted ones): run without it")
    backend = _backend(arch)
    kw = dict(kwargs)
    # As JITFunction.run sets them before binding.
    kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kw[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
    return signature, constexprs, attrs, options


def _span(t: torch.Tensor) -> int:
    """Elements from a tensor's first to its last (as offsets from its data pointer reach them)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


@dataclasses.dataclass
class Variant:
    """One compilation: a kernel, a target, a specialisation, and every launch that compiles to it."""
    kernel: str
    fn: Any
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: Any
    dtype: str
    uses: list[str] = dataclasses.field(default_factory=list)
    spans: dict[str, int] = dataclasses.field(default_factory=dict)  # pointer argument -> largest span (elements)
    grid: list[int] = dataclasses.field(default_factory=lambda: [0, 0, 0])  # largest grid

    def choice(self) -> str:
        """What the launcher chose: the dtype, the kernel's constexprs, the warps."""
        parts = [self.dtype]
        for (i,), v in sorted(self.constexprs.items()):
            if self.fn.params[i].is_constexpr:
                name = self.fn.arg_names[i]
                parts.append(name if v is True else f"!{name}" if v is False else f"{name}={v}")
        parts.append(f"{self.options.num_warps}w")
        return " ".join(parts)

    def specialisation(self) -> str:
        """How Triton specialised the other arguments: i64 ints, ints equal to 1 (constants), ints and pointers
        without the divisibility by 16 the others have."""
        names, parts = self.fn.arg_names, []
        wide = [k for k, t in self.signature.items() if t == "i64"]
        ones = [names[i] for (i,), _ in sorted(self.constexprs.items()) if not self.fn.params[i].is_constexpr]
        plain = [names[i] for (i,), a in sorted(self.attrs.items())
                 if not a and self.signature[names[i]] != "constexpr"]
        for what, items in (("i64", wide), ("=1", ones), ("%16!=0", plain)):
            if items:
                parts.append(f"{what} {','.join(items)}")
        return "; ".join(parts) or "-"


def collect(launches: Iterable[Launch], targets: Iterable[Target]) -> list[Variant]:
    """The distinct compilations of these launches, per target, in first-seen order."""
    variants: dict[str, Variant] = {}
    launches = list(launches)
    for target in targets:
        for launch in launches:
            if launch.targets is not None and target.arch not in launch.targets:
                continue
            signature, constexprs, attrs, options = specialize(launch.fn, launch.args, launch.kwargs, target.arch)
            key = hashlib.sha256(repr((launch.kernel, launch.fn.cache_key, target.arch, sorted(signature.items()),
                                       sorted(constexprs.items()), sorted(attrs.items()),
                                       sorted(options.__dict__.items()))).encode()).hexdigest()
            v = variants.get(key)
            if v is None:
                v = variants[key] = Variant(launch.kernel, launch.fn, target.arch, signature, constexprs, attrs,
                                            options, launch.dtype)
            if launch.at not in v.uses:
                v.uses.append(launch.at)
            for name, value in [*zip(launch.fn.arg_names, launch.args), *launch.kwargs.items()]:
                if isinstance(value, torch.Tensor):
                    v.spans[name] = max(v.spans.get(name, 0), _span(value))
            grid = list(launch.grid) + [1] * (3 - len(launch.grid))
            v.grid = [max(a, b) for a, b in zip(v.grid, grid)]
    return list(variants.values())


# ----------------------------------------------------------------------------------------------------------------
# 64-bit offsets: a dataflow pass over the TTIR
# ----------------------------------------------------------------------------------------------------------------

_NAME = r"%[\w$.-]+"
_REF = re.compile(r"(%[\w$.-]+)(?:#\d+)?")
_RESULTS = re.compile(rf"^((?:{_NAME}(?::\d+)?)(?:\s*,\s*{_NAME}(?::\d+)?)*)\s*=\s*(.*)$")
_FUNC = re.compile(r"^tt\.func\s+(?:public\s+|private\s+)?@[\w$.-]+\((.*)\)")
_ARG = re.compile(rf"({_NAME}):\s*(!tt\.ptr<[^>]*>|[\w<>!.]+)")
_FOR = re.compile(rf"scf\.for\s+({_NAME})\s*=\s*({_NAME})\s+to\s+({_NAME})\s+step\s+({_NAME})"
                  rf"(?:\s+iter_args\((.*?)\))?")
_NARROWING = {"arith.muli": 1, "arith.shli": 1, "arith.addi": 2, "arith.subi": 2}  # run-time operands that make it so
_SOURCES = ("tt.get_program_id", "tt.get_num_programs", "tt.load", "tt.atomic_rmw", "tt.atomic_cas")


def _strip_locs(line: str) -> str:
    """The line without its loc(...) annotations (nested parentheses included)."""
    out, i = [], 0
    while True:
        j = line.find("loc(", i)
        if j < 0:
            out.append(line[i:])
            return "".join(out)
        out.append(line[i:j])
        depth, k = 0, j + 3
        while k < len(line):
            if line[k] == "(":
                depth += 1
            elif line[k] == ")":
                depth -= 1
                if depth == 0:
                    break
            k += 1
        i = k + 1


def _locations(ttir: str) -> dict[str, str]:
    """#locN -> "file.py:line" where it resolves to one."""
    raw = dict(re.findall(r"^(#loc\d*) = loc\((.*)\)\s*$", ttir, flags=re.M))
    resolved: dict[str, str] = {}

    def resolve(ref: str, depth: int = 0) -> str:
        if ref in resolved or depth > 50:
            return resolved.get(ref, "")
        body = raw.get(ref, "")
        m = re.search(r'"([^"]+\.py)":(\d+)', body)
        if m:
            where = f"{os.path.basename(m.group(1))}:{m.group(2)}"
        else:
            inner = re.search(r"(#loc\d*)", body)
            where = resolve(inner.group(1), depth + 1) if inner else ""
        resolved[ref] = where
        return where

    for ref in raw:
        resolve(ref)
    return resolved


def _element_type(type_text: str) -> str:
    m = re.search(r"(i\d+|f\d+|bf16|index)>?\s*$", type_text.strip())
    return m.group(1) if m else ""


def offset_violations(ttir: str, big: set[str], arg_names: Optional[list[str]] = None) -> list[str]:
    """Where an offset added to a pointer into a big tensor (a pointer argument named in `big`) was computed by
    i32 arithmetic on run-time values: an i32 multiply or shift with a run-time operand (program ids, arguments,
    loaded values, loop variables), or an i32 add/subtract of two, anywhere on the way to the offset. Constants and
    tl.arange ranges alone are bounded and do not count. A dataflow pass over the TTIR (values, loop-carried
    values and region results, to a fixed point). `arg_names`: the kernel's names of the TTIR function's
    arguments, in order, where the TTIR does not use them."""
    deps: dict[str, set[str]] = {}
    source: set[str] = set()  # run-time values that depend on nothing else
    narrowing: dict[str, tuple[int, str]] = {}  # value -> (run-time operands that make it narrow, where)
    roots: dict[str, set[str]] = {}  # pointer arguments -> themselves
    addptrs: list[tuple[str, str, str]] = []  # (pointer, offset, where)
    locs = _locations(ttir)
    stack: list[dict] = []  # open regions: {"results": [...], "iters": [...], "operands": [...]}

    def add(name: str, on: Iterable[str]) -> None:
        deps.setdefault(name, set()).update(on)

    for raw in ttir.splitlines():
        loc = re.search(r"loc\((#loc\d*)\)\s*$", raw)
        where = locs.get(loc.group(1), "") if loc else ""
        line = _strip_locs(raw).strip()
        if not line or line.startswith("#") or line.startswith("module"):
            continue
        func = _FUNC.match(line)
        if func:
            for i, (name, ty) in enumerate(_ARG.findall(func.group(1))):
                label = name[1:] if arg_names is None or i >= len(arg_names) else arg_names[i]
                deps.setdefault(name, set())
                source.add(name)
                if ty.startswith("!tt.ptr"):
                    roots[name] = {label}
            stack.append({"results": [], "iters": [], "operands": []})
            continue
        if line.startswith("}"):
            region = stack.pop() if stack else None
            if region is not None and line.rstrip().endswith("{"):  # } else {
                stack.append(region)
            continue
        if line.startswith("^"):  # block arguments: from the region op's operands
            operands = stack[-1]["operands"] if stack else []
            for name in re.findall(rf"({_NAME}):", line):
                add(name, operands)
            continue
        results: list[str] = []
        rhs = line
        m = _RESULTS.match(line)
        if m:
            for r in m.group(1).split(","):
                r = r.strip()
                results.append(r.split(":")[0])
            rhs = m.group(2)
        op = rhs.split("(")[0].split()[0].strip('"') if rhs.split() else ""
        refs = [r for r in _REF.findall(rhs)]
        opens = line.rstrip().endswith("{")
        if op in ("scf.yield", "tt.reduce.return", "tt.scan.return", "scf.condition") and stack:
            region = stack[-1]
            if region["iters"] and len(refs) == len(region["iters"]):  # a for loop: positional
                for it, res, ref in zip(region["iters"], region["results"] or [None] * len(refs), refs):
                    add(it, [ref])
                    if res is not None:
                        add(res, [ref])
            else:
                for res in region["results"]:
                    add(res, refs)
            continue
        if op == "scf.for":
            f = _FOR.search(rhs)
            if f:
                iv, lb, ub, st, iters = f.groups()
                add(iv, [lb, ub, st])
                names = []
                for pair in (iters or "").split(","):
                    if "=" in pair:
                        it, init = (p.strip() for p in pair.split("=", 1))
                        add(it, [init])
                        names.append(it)
                for r in results:
                    add(r, [])
                if opens:
                    stack.append({"results": results, "iters": names, "operands": []})
                continue
        for r in results:
            add(r, [] if op == "scf.if" else refs)
            if op.startswith(_SOURCES):
                source.add(r)
            if op in _NARROWING and _element_type(rhs.rsplit(":", 1)[-1]) == "i32":
                narrowing[r] = (_NARROWING[op], where)
        if op == "tt.addptr" and len(refs) >= 2:
            addptrs.append((refs[0], refs[1], where))
        if opens:
            stack.append({"results": results, "iters": [], "operands": refs})

    # Fixed point: run-time-ness, narrowness (with where it came from) and pointer roots flow along deps.
    runtime = set(source)
    narrow: dict[str, str] = {}
    root = {k: set(v) for k, v in roots.items()}
    changed = True
    while changed:
        changed = False
        for name, on in deps.items():
            if name not in runtime and any(d in runtime for d in on):
                runtime.add(name)
                changed = True
            if name not in narrow:
                why = next((narrow[d] for d in on if d in narrow), None)
                if why is None and name in narrowing:
                    need, where = narrowing[name]
                    if sum(1 for d in on if d in runtime) >= need:
                        why = f"{name} ({where})" if where else name
                if why is not None:
                    narrow[name] = why
                    changed = True
            got = set().union(*(root.get(d, set()) for d in on)) if on else set()
            if not got <= root.get(name, set()):
                root.setdefault(name, set()).update(got)
                changed = True
    found = []
    for ptr, off, where in addptrs:
        hit = sorted(root.get(ptr, set()) & big)
        if hit and off in narrow:
            found.append(f"{'/'.join(hit)} + {off} at {where or '?'}: i32 arithmetic at {narrow[off]}")
    return found


# ----------------------------------------------------------------------------------------------------------------
# Compiling and checking
# ----------------------------------------------------------------------------------------------------------------

_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spills": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def _ptxas_stats(log: str) -> dict:
    regs = _PTXAS["registers"].search(log)
    spills = _PTXAS["spills"].search(log)
    stack = _PTXAS["stack"].search(log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spills.group(1)) if spills else None,
            "spill_loads": int(spills.group(2)) if spills else None,
            "stack_bytes": int(stack.group(1)) if stack else None}


def _cubin_registers(cubin: bytes, workdir: str) -> Optional[int]:
    """REG of the cubin's function (cuobjdump -res-usage, bundled with triton), or None where it cannot tell."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    path = os.path.join(workdir, f"k{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    finally:
        os.remove(path)
    m = re.search(r"REG:(\d+)", out)
    return int(m.group(1)) if m else None


def max_warps(registers: int) -> int:
    """Warps one block can have with this many registers per thread (register file, per-warp allocation)."""
    per_warp = math.ceil(registers * 32 / REGISTER_UNIT) * REGISTER_UNIT
    return min(REGISTER_FILE // per_warp, MAX_THREADS // 32) if per_warp else MAX_THREADS // 32


def compile_variant(v: Variant, workdir: str) -> dict:
    """Compile one variant for its target and check it; a dict for the report (JSON-able)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = TARGETS[v.arch]
    big = {name for name, span in v.spans.items() if span >= INT32_ELEMENTS}
    row = {
        "kernel": v.kernel, "sm": v.arch, "target": target.name, "variant": v.choice(),
        "specialisation": v.specialisation(), "dtype": v.dtype,
        "num_warps": v.options.num_warps, "num_stages": v.options.num_stages,
        "signature": {k: t for k, t in v.signature.items() if t != "constexpr"},
        "constexprs": {v.fn.arg_names[i]: c for (i,), c in sorted(v.constexprs.items())},
        "used_by": v.uses, "spans": v.spans, "int64_tensors": sorted(big), "grid": v.grid,
    }
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), knobs.nvidia.scope(), \
                knobs.compilation.scope():
            warnings.simplefilter("ignore")  # e.g. 3.9's notice that the default of fp fusion will change
            knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas' log: the registers and spills
            knobs.compilation.always_compile = True  # a cache hit would run no ptxas, hence print no log
            compiled = triton.compile(ASTSource(v.fn, v.signature, v.constexprs, v.attrs),
                                      target=GPUTarget("cuda", v.arch, 32), options=v.options.__dict__)
    except Exception as e:  # noqa: BLE001 -- a failed compile is a result
        row.update(compiled=False, error=f"{type(e).__name__}: {e}"[:2000],
                   compile_s=round(time.perf_counter() - t0, 3))
        row["checks"] = {"compiled": False}
        row["ok"] = False
        return row
    row["compiled"] = True
    row["compile_s"] = round(time.perf_counter() - t0, 3)
    stats = _ptxas_stats(log.getvalue())
    row.update(stats)
    row["ptxas_log"] = log.getvalue().strip()
    row["cubin_registers"] = _cubin_registers(compiled.asm["cubin"], workdir)
    if row["registers"] is None:
        row["registers"] = row["cubin_registers"]
    row["shared"] = compiled.metadata.shared
    row["shared_limit"] = target.shared_limit
    ttir = compiled.asm["ttir"]
    names = [n for n in v.fn.arg_names if v.signature.get(n) != "constexpr"]
    row["offset_violations"] = offset_violations(ttir, big, names) if big else []
    regs = row["registers"]
    row["max_warps"] = max_warps(regs) if regs is not None else None
    row["checks"] = {
        "compiled": True,
        "no_spills": stats["spill_stores"] == 0 and stats["spill_loads"] == 0,
        "shared_fits": row["shared"] <= target.shared_limit,
        "registers_fit": regs is not None and regs <= 255 and v.options.num_warps <= row["max_warps"],
        "offsets_64bit": not row["offset_violations"],
        "grid_fits": all(g <= lim for g, lim in zip(v.grid, GRID_LIMITS)),
    }
    if row["cubin_registers"] is not None and stats["registers"] is not None:
        row["checks"]["registers_match_cubin"] = row["cubin_registers"] == stats["registers"]
    row["ok"] = all(row["checks"].values())
    return row


_POOL_VARIANTS: list[Variant] = []  # read by forked workers


def _compile_index(job: tuple[int, str]) -> dict:
    i, workdir = job
    return compile_variant(_POOL_VARIANTS[i], workdir)


def compile_all(variants: list[Variant], jobs: int = 1) -> list[dict]:
    """Compile every variant (`jobs` processes where fork exists), in a private Triton cache (always a real
    compile, nothing left behind)."""
    from triton import knobs

    global _POOL_VARIANTS
    workdir = tempfile.mkdtemp(prefix="longtune-aot-")
    try:
        with knobs.cache.scope():
            knobs.cache.dir = os.path.join(workdir, "cache")
            if jobs > 1 and len(variants) > 1 and "fork" in multiprocessing.get_all_start_methods():
                _POOL_VARIANTS = variants
                try:
                    with multiprocessing.get_context("fork").Pool(min(jobs, len(variants))) as pool:
                        return pool.map(_compile_index, [(i, workdir) for i in range(len(variants))], chunksize=1)
                finally:
                    _POOL_VARIANTS = []
            return [compile_variant(v, workdir) for v in variants]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def check_launches(launches: list[Launch], targets: Iterable[Target], jobs: int = 1) -> list[dict]:
    """Specialise, deduplicate, compile and check these launches for these targets."""
    return compile_all(collect(launches, list(targets)), jobs)


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def _kb(n: Optional[int]) -> str:
    return "-" if n is None else (f"{n / 1024:.1f} KB" if n >= 1024 else f"{n} B")


def _spills(rows: list[dict]) -> str:
    if any(r.get("spill_stores") is None for r in rows):
        return "?"
    st, ld = sum(r["spill_stores"] for r in rows), sum(r["spill_loads"] for r in rows)
    return "0" if not (st or ld) else f"{st} B st / {ld} B ld"


def _status(rows: list[dict]) -> str:
    failed = sorted({k for r in rows for k, good in r["checks"].items() if not good})
    return "ok" if not failed else "FAIL: " + ", ".join(failed)


def _range(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def table(rows: list[dict]) -> str:
    """Markdown, one row per compiled variant and target: kernel, variant (the launcher's choice), Triton's
    specialisation of the other arguments, sm, registers, shared memory, spills, the tensors that need 64-bit
    offsets at these sizes, the checks."""
    lines = ["| kernel | variant | specialisation | sm | registers | shared memory | spills | i64 offsets for "
             "| checks |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["variant"], r["specialisation"], r["sm"])):
        lines.append(f"| `{r['kernel']}` | {r['variant']} | {r['specialisation']} | {r['sm']} | "
                     f"{_range([r.get('registers')])} | {_kb(r.get('shared'))} | {_spills([r])} | "
                     f"{', '.join(r['int64_tensors']) or '-'} | {_status([r])} |")
    return "\n".join(lines)


def grouped(rows: list[dict]) -> str:
    """Markdown, one row per launcher choice and target (the specialisations of one choice together): kernel,
    variant, sm, registers (range), shared memory (largest), spills, how many compilations, checks."""
    lines = ["| kernel | variant | sm | registers | shared memory | spills | compiled | checks |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["variant"], r["sm"]), []).append(r)
    for (kernel, variant, sm), rs in sorted(groups.items()):
        shared = [r["shared"] for r in rs if r.get("shared") is not None]
        lines.append(f"| `{kernel}` | {variant} | {sm} | {_range([r.get('registers') for r in rs])} | "
                     f"{_kb(max(shared)) if shared else '-'} | {_spills(rs)} | {len(rs)} | {_status(rs)} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Markdown, one row per kernel and target: compilations, registers (range), shared memory (largest), spills."""
    lines = ["| kernel | sm | compiled | registers | shared memory | spills | checks |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["sm"]), []).append(r)
    for (kernel, sm), rs in sorted(groups.items()):
        shared = [r["shared"] for r in rs if r.get("shared") is not None]
        lines.append(f"| `{kernel}` | {sm} | {len(rs)} | {_range([r.get('registers') for r in rs])} | "
                     f"{_kb(max(shared)) if shared else '-'} | {_spills(rs)} | {_status(rs)} |")
    return "\n".join(lines)


def _git_commit() -> Optional[str]:
    """HEAD of the checkout this file is in, "(dirty tree)" when anything but bench/results differs (as
    bench/provenance.py writes it; kernels may not import bench); None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!bench/results"],
                               capture_output=True, text=True, cwd=root).stdout.strip()
    except OSError:
        return None
    return (head + (" (dirty tree)" if dirty else "")) if head else None


def _environment() -> dict:
    import platform

    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "triton": triton.__version__, "cpu_cores": os.cpu_count(),
           "device": "none: Triton's compiler and its bundled ptxas, targets given explicitly"}
    for arch in sorted(TARGETS):  # Triton picks the ptxas per target (3.9: the newer one from sm_90 on)
        try:
            version = subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, text=True).stdout
        except OSError:
            version = ""
        env[f"ptxas_sm_{arch}"] = next((line for line in version.splitlines() if "release" in line), None)
    return env


def run(targets: Iterable[int] = (80, 90), jobs: int = 1) -> dict:
    """Enumerate, compile and check every variant; the report (JSON-able)."""
    t0 = time.time()
    chosen = [TARGETS[a] for a in targets]
    launches = llama_launches(chosen)
    rows = check_launches(launches, chosen, jobs)
    return {
        "bench": "kernel_compile",
        "date": time.strftime("%Y-%m-%d"),
        "duration_s": round(time.time() - t0, 1),
        "commit": _git_commit(),
        "command": ("python -m longtune.kernels.aot " + " ".join(sys.argv[1:])) if sys.argv[0].endswith("aot.py")
        else "longtune.kernels.aot.run()",
        "environment": _environment(),
        "targets": {t.name: {"gpus": t.gpus, "shared_limit": t.shared_limit, "sm_counts": list(t.sm_counts)}
                    for t in chosen},
        "sizes": {"models": [dataclasses.asdict(m) for m in MODELS], "tokens": list(TOKENS),
                  "dtypes": [_SHORT[d] for d in DTYPES], "galore_rank": GALORE_RANK},
        "launches": len(launches),
        "variants": len(rows),
        "passed": all(r["ok"] for r in rows),
        "rows": rows,
    }


def write_json(report: dict, path: str) -> None:
    """The report, one row per line; left out: ptxas' logs (their numbers are in the rows), the full signature and
    constexprs (`variant` and `specialisation` say them)."""
    head = {k: v for k, v in report.items() if k != "rows"}
    text = json.dumps(head, indent=1, default=str)[:-2]
    rows = [json.dumps({k: v for k, v in r.items() if k not in ("ptxas_log", "signature", "constexprs")}, default=str)
            for r in report["rows"]]
    with open(path, "w") as f:
        f.write(text + ',\n "rows": [\n  ' + ",\n  ".join(rows) + "\n ]\n}\n")


def triton_missing() -> Optional[str]:
    """Why nothing can be compiled here, or None."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: triton.jit gives interpreted functions, which cannot be compiled"
    try:
        from triton.backends import backends
    except Exception as e:  # noqa: BLE001
        return f"triton's backends do not load: {e}"
    if "nvidia" not in backends:
        return "this triton has no NVIDIA backend"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longtune.kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--table", action="store_true", help="one row per compiled variant and target")
    p.add_argument("--grouped", action="store_true",
                   help="one row per launcher choice (dtype, block sizes, warps) and target (the default)")
    p.add_argument("--summary", action="store_true", help="one row per kernel and target")
    p.add_argument("--json", metavar="PATH", help="write the whole report as JSON")
    p.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    p.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8), help="compiling processes")
    a = p.parse_args(argv)
    why = triton_missing()
    if why:
        print(f"longtune.kernels.aot: {why}", file=sys.stderr)
        return 2
    report = run([int(x) for x in a.targets.split(",")], a.jobs)
    if a.json:
        write_json(report, a.json)
    shown = False
    for flag, show in ((a.summary, summary), (a.grouped, grouped), (a.table, table)):
        if flag:
            print(show(report["rows"]) + "\n")
            shown = True
    if not shown and not a.json:
        print(grouped(report["rows"]) + "\n")
    failed = [r for r in report["rows"] if not r["ok"]]
    print(f"{report['variants']} compiled variants ({report['launches']} launches) for "
          f"{', '.join(report['targets'])}: {len(failed)} failing, {report['duration_s']} s", file=sys.stderr)
    for r in failed:
        print(f"FAIL {r['kernel']} sm_{r['sm']} {r['variant']} [{r['specialisation']}]: {_status([r])} "
              f"{r.get('error', '')}{'; '.join(r.get('offset_violations', []))}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
