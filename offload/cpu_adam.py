"""The AdamW step on CPU tensors, for optimizer state that lives off the GPU.

Two backends update fp32 params and moments in place:

- "torch fused": `torch._fused_adamw_`, torch's vectorised OpenMP kernel, called exactly as
  `torch.optim.AdamW(fused=True)` calls it, so the result is bitwise that optimizer's.
- "deepspeed cpu_adam": DeepSpeed's C++ CPU Adam (adamw_mode=True). Same update, eps added to
  sqrt(v / (1 - beta2^t)) as torch does, but float32 bias corrections and FMAs: within ~3e-7 of
  torch relative to each tensor's largest value, not bitwise (an element that nearly cancels,
  e.g. a momentum near zero, can differ by 1e-3 of itself).

The trainer calls `CpuAdamW.step` once per layer from a worker thread while the main thread
runs backward. torch's kernel runs without the GIL; DeepSpeed's holds it, so it is called in
chunks (`_DS_CHUNK`). Both use `torch.get_num_threads()` OpenMP threads from whichever thread
calls them. "auto" is torch fused: bitwise the in-memory optimizer, and on the machines
measured (bench/cpu_adam.py) as fast as DeepSpeed's op, which needs a ~1 min build; a timing
probe could pick either per run, and a run that resumed on the other would stop being exact.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from .live_bytes import holds_no_data

TORCH_FUSED = "torch fused"
DEEPSPEED = "deepspeed cpu_adam"
BACKENDS = ("auto", "torch", "deepspeed")

# DeepSpeed's adam_update is bound without releasing the GIL, so one call over a whole layer
# (hundreds of millions of elements) would freeze every Python hook of the concurrent backward.
# 4M elements is a few milliseconds per call, about Python's own GIL switch interval. A multiple of
# DeepSpeed's SIMD tile (8 x 16 floats): the op rounds a tile's tail differently, so only seams on
# tile boundaries leave the bits of one whole-tensor call unchanged.
_DS_CHUNK = 1 << 22


@dataclass(frozen=True)
class AdamWHyper:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float

    def __post_init__(self):
        # The same bounds torch.optim.AdamW enforces; DeepSpeed would silently ignore a negative decay.
        if isinstance(self.lr, Tensor) or not self.lr >= 0:
            raise ValueError(f"AdamWHyper.lr must be a float >= 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"AdamWHyper.betas must be two floats in [0, 1), got {self.betas!r}")
        if not self.eps >= 0:
            raise ValueError(f"AdamWHyper.eps must be >= 0, got {self.eps!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"AdamWHyper.weight_decay must be >= 0, got {self.weight_decay!r}")


def bitwise_equal_to_torch_fused(backend_name: str) -> bool:
    """True when `backend_name` gives exactly the bits of torch.optim.AdamW(fused=True)."""
    if backend_name not in (TORCH_FUSED, DEEPSPEED):
        raise ValueError(f"unknown CPU Adam backend name {backend_name!r}; expected {TORCH_FUSED!r} or {DEEPSPEED!r}")
    return backend_name == TORCH_FUSED


# ------------------------------------------------------------------------------ deepspeed op


def _deepspeed_dir() -> Path | None:
    # find_spec of the top-level package reads no deepspeed code: importing it costs seconds.
    spec = importlib.util.find_spec("deepspeed")
    return Path(spec.origin).parent if spec and spec.origin else None


def deepspeed_jit_build_dir() -> Path:
    """Where torch's JIT builder puts DeepSpeed's cpu_adam (mirrors cpp_extension._get_build_directory)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        accel = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                 f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
        root = os.path.join(get_default_build_root(),
                            f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accel}")
    return Path(root) / "cpu_adam"


def deepspeed_cpu_adam_built() -> bool:
    """True when DeepSpeed's cpu_adam op can be loaded without compiling anything."""
    ds = _deepspeed_dir()
    if ds is None:
        return False
    if any((ds / "ops" / "adam").glob("cpu_adam_op*.so")):  # installed with DS_BUILD_CPU_ADAM=1
        return True
    lib = deepspeed_jit_build_dir() / "cpu_adam.so"
    if not lib.exists():
        return False
    # ninja would rebuild a library older than its sources (a DeepSpeed upgrade): that is a compile.
    csrc = ds / "ops" / "csrc"
    sources = [csrc / "adam" / "cpu_adam.cpp", csrc / "adam" / "cpu_adam_impl.cpp", *(csrc / "includes").glob("*.h")]
    return lib.stat().st_mtime >= max((s.stat().st_mtime for s in sources if s.exists()), default=0.0)


def _load_deepspeed_op():
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        return CPUAdamBuilder().load(verbose=False)
    except Exception as e:  # ImportError, compiler errors, incompatible hardware: all mean "no DeepSpeed"
        raise RuntimeError(f"DeepSpeed's cpu_adam op could not be built or loaded: {type(e).__name__}: {e}") from e


def _new_deepspeed_optimizer(op) -> int:
    # Share DeepSpeedCPUAdam's id counter: the op keeps one C++ optimizer per id in a global table.
    from deepspeed.ops.adam.cpu_adam import DeepSpeedCPUAdam

    opt_id = DeepSpeedCPUAdam.optimizer_id
    DeepSpeedCPUAdam.optimizer_id += 1
    # betas here are placeholders: each adam_update passes its own and the op recomputes beta^t.
    op.create_adam(opt_id, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False)
    return opt_id


# ---------------------------------------------------------------------------------- stepping


def _check_tensors(params, grads, exp_avgs, exp_avg_sqs) -> None:
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    lengths = {name: len(ts) for name, ts in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"CpuAdamW.step needs lists of equal length, got {lengths}")
    for i, p in enumerate(params):
        for name, ts in lists.items():
            t = ts[i]
            if not isinstance(t, Tensor) or t.device.type != "cpu" or t.dtype != torch.float32:
                what = f"{t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"CpuAdamW.step: {name}[{i}] must be a float32 CPU tensor, got {what}")
            if t.shape != p.shape:
                raise ValueError(f"CpuAdamW.step: {name}[{i}] has shape {tuple(t.shape)}, params[{i}] has {tuple(p.shape)}")
            # Both kernels walk raw memory: mixed strides give wrong numbers, and DeepSpeed would
            # update a contiguous copy and drop it.
            if not t.is_contiguous():
                raise ValueError(f"CpuAdamW.step: {name}[{i}] is not contiguous")
            if name != "params" and t.numel() and not holds_no_data(t) and t.data_ptr() == p.data_ptr():
                raise ValueError(f"CpuAdamW.step: {name}[{i}] shares memory with params[{i}]")


class CpuAdamW:
    """In-place AdamW over fp32 CPU tensors; `backend`: "auto" | "torch" | "deepspeed"."""

    def __init__(self, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"CpuAdamW backend must be one of {BACKENDS}, got {backend!r}")
        self._op = None
        self._opt_id = None
        self._lock = threading.Lock()  # the C++ optimizer keeps lr and beta^t between calls
        if backend == "deepspeed":
            self._use_deepspeed(_load_deepspeed_op())
        self.backend_name = DEEPSPEED if self._op is not None else TORCH_FUSED

    def _use_deepspeed(self, op) -> None:
        self._op = op
        self._opt_id = _new_deepspeed_optimizer(op)
        self._finalizer = weakref.finalize(self, op.destroy_adam, self._opt_id)

    def close(self) -> None:
        """Free DeepSpeed's C++ optimizer state (no-op for torch)."""
        if self._op is not None:
            self._finalizer()
            self._op = self._opt_id = None

    def step(self, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
             step: int, hyper: AdamWHyper) -> None:
        """One AdamW update in place; `step` counts from 1 and is the count after this update, as torch's."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"CpuAdamW.step: step must be an int >= 1 (torch's count after the update), got {step!r}")
        if not isinstance(hyper, AdamWHyper):
            raise ValueError(f"CpuAdamW.step: hyper must be an AdamWHyper, got {type(hyper).__name__}")
        _check_tensors(params, grads, exp_avgs, exp_avg_sqs)
        if not params:
            return
        if self._op is not None:
            self._step_deepspeed(params, grads, exp_avgs, exp_avg_sqs, step, hyper)
        else:
            self._step_torch(params, grads, exp_avgs, exp_avg_sqs, step, hyper)

    @staticmethod
    def _step_torch(params, grads, exp_avgs, exp_avg_sqs, step, hyper) -> None:
        # torch.optim.AdamW adds 1 to its float32 step tensors and then calls this kernel, which
        # only reads them; so the count after the update goes in. One tensor serves every param.
        state_step = torch.tensor(float(step), dtype=torch.float32)
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], [state_step] * len(params),
                            lr=float(hyper.lr), beta1=float(hyper.betas[0]), beta2=float(hyper.betas[1]),
                            weight_decay=float(hyper.weight_decay), eps=float(hyper.eps), amsgrad=False, maximize=False)

    def _step_deepspeed(self, params, grads, exp_avgs, exp_avg_sqs, step, hyper) -> None:
        # OpenMP's thread count is per calling thread; torch sets it only in threads where it ran a
        # parallel op, so a fresh worker thread would otherwise use every core whatever torch says.
        torch.set_num_threads(torch.get_num_threads())
        beta1, beta2 = hyper.betas
        with self._lock:
            for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
                p, g, m, v = p.view(-1), g.view(-1), m.view(-1), v.view(-1)
                for lo in range(0, p.numel(), _DS_CHUNK):
                    hi = lo + _DS_CHUNK
                    self._op.adam_update(self._opt_id, step, hyper.lr, beta1, beta2, hyper.eps, hyper.weight_decay,
                                         True, p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi])
