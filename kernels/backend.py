"""Whether the Triton kernels can run here, or the torch reference versions stand in.

Triton runs on a CUDA GPU, or on the CPU under its interpreter (TRITON_INTERPRET=1,
set before triton is first imported; fp32/fp16 only). Elsewhere every kernel
falls back to its torch reference, with a one-line notice, once.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Run the Triton kernel for a tensor on t's device?"""
    if not triton_available():
        _notice("triton is not installed")
        return False
    if t.is_cuda or interpreting() or holds_no_data(t):  # no data: a dry run, which launches nothing (launch)
        return True
    _notice("no GPU and TRITON_INTERPRET is not 1")
    return False


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), except on tensors that hold no data (a dry run on meta and fake tensors,
    trainer/dry_run.py): there the launcher's buffers are allocated as on a GPU and the kernel does not run."""
    if not any(isinstance(a, torch.Tensor) and holds_no_data(a) for a in args):
        kernel[grid](*args, **kwargs)


def holds_no_data(t: torch.Tensor) -> bool:
    """A meta tensor, or a fake one (offload/live_bytes.py has the same test; kernels import nothing of longtune)."""
    return t.untyped_storage().device.type == "meta"


@functools.lru_cache(maxsize=None)
def _notice(reason: str) -> None:
    print(f"longtune.kernels: {reason}; using the torch reference kernels", file=sys.stderr)


def num_warps(block_size: int) -> int:
    """Warps for a program handling `block_size` elements (Liger's calculate_settings)."""
    for threshold, warps in ((32768, 32), (8192, 16), (2048, 8)):
        if block_size >= threshold:
            return warps
    return 4
