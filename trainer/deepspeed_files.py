"""DeepSpeed's checkpoint files, read with `weights_only=True`: the engine's loads (deepspeed_strategy.py) and the
fp32 weights gathered from a ZeRO checkpoint in one process (checkpoint.py: export, and a DeepSpeed checkpoint
loaded without DeepSpeed's engine). DeepSpeed itself unpickles everything; here only tensors and the three
classes it pickles are let through.

Importing this module picks DeepSpeed's accelerator on a machine without CUDA, before DeepSpeed is imported;
DeepSpeed itself is imported only inside the functions.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():  # said once here, not as DeepSpeed's warning on every import
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def safe_globals() -> list:
    """The only non-tensor objects DeepSpeed pickles into its checkpoints (every stage, with and without offload)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def weights_only_engine(engine):
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True (it unpickles anything otherwise)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allowed = safe_globals()

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnly(engine._config)


@contextlib.contextmanager
def _weights_only_loads():
    """torch.load with weights_only=True and DeepSpeed's three classes, whatever the caller asks (zero_to_fp32)."""
    real = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(safe_globals()):
            return real(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def fp32_state_dict(folder: Path, tag: str) -> dict:
    """The full fp32 weights of a ZeRO checkpoint, gathered in this one process (no process group): export."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _weights_only_loads(), contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
