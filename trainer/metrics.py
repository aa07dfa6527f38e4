"""Step metrics to the console (with a progress bar), metrics.jsonl and TensorBoard."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .errors import RunError, full_disk_hint


def _drop_partial_line(f) -> None:
    """Cut a last line without its newline (what a writer killed mid-line leaves) off a file open for appending."""
    size = os.fstat(f.fileno()).st_size
    if not size:
        return
    with open(f.name, "rb") as r:
        r.seek(max(size - (1 << 16), 0))
        tail = r.read()
    if tail.endswith(b"\n"):
        return
    cut = tail.rfind(b"\n")
    if cut < 0 and size > len(tail):  # a line longer than the tail read: look further back
        with open(f.name, "rb") as r:
            cut = r.read().rfind(b"\n")
        os.ftruncate(f.fileno(), cut + 1)
        return
    os.ftruncate(f.fileno(), size - len(tail) + cut + 1)


def host_memory_gb() -> dict[str, float]:
    """Current and peak resident set size of this process."""
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        rss = peak_kb * 1024
    return {"host_rss_gb": rss / 2**30, "host_peak_rss_gb": peak_kb / 2**20}


def gpu_memory_gb(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {
        "gpu_peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
        "gpu_peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
        "gpu_alloc_retries": torch.cuda.memory_stats(device).get("num_alloc_retries", 0),
    }


def reset_gpu_peak(device: torch.device) -> None:
    """The allocator's peak starts over: each step's logged peak is its own (not an evaluation's, or a
    checkpoint's gather), and the runtime's plan-vs-measured figure is about training alone."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class MetricsLogger:
    """metrics.jsonl holds whole lines only: each is written with one unbuffered append, and one that fails (a full
    disk) is cut off again; a partial last line (a process killed mid-write) is dropped when the run resumes."""

    def __init__(self, output_dir: Path, sinks: list[str], total_steps: int, start_step: int = 0):
        self.sinks = set(sinks)
        self.path = Path(output_dir) / "metrics.jsonl"
        self.jsonl = None
        if "jsonl" in self.sinks:
            try:
                self.jsonl = open(self.path, "ab", buffering=0)
                _drop_partial_line(self.jsonl)
            except OSError as e:
                raise RunError(f"could not write {self.path}: {e.strerror or e}{full_disk_hint(e)}") from None
        self.tensorboard, self.tensorboard_dir, self._tensorboard_failed = None, Path(output_dir) / "tensorboard", False
        if "tensorboard" in self.sinks:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_writer_threads()
            try:
                self.tensorboard = SummaryWriter(str(self.tensorboard_dir))
            except OSError as e:  # its first event is written (and flushed) at once
                raise self._tensorboard_error(e) from None
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable="console" not in self.sinks or not sys.stderr.isatty(),
        )

    def advance(self) -> None:
        self.bar.update(1)

    def log(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        if self.jsonl:
            self._append((json.dumps(record) + "\n").encode())
        if self.tensorboard:
            try:
                for key, value in values.items():
                    if isinstance(value, (int, float)):
                        self.tensorboard.add_scalar(key, value, step)
                self.tensorboard.flush()
            except OSError as e:  # raised in its writer thread, handed over here
                raise self._tensorboard_error(e) from None
        if "console" in self.sinks:
            self.bar.write(format_line(record))

    def _append(self, line: bytes) -> None:
        end = os.fstat(self.jsonl.fileno()).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[self.jsonl.write(view):]
        except OSError as e:
            with contextlib.suppress(OSError):  # shrinking needs no space
                os.ftruncate(self.jsonl.fileno(), end)
            raise RunError(f"could not write {self.path}: {e.strerror or e}{full_disk_hint(e)}") from None

    def _tensorboard_error(self, e: OSError) -> RunError:
        """A failed TensorBoard write as one line naming the events file (the writer thread's OSError names none)."""
        self._tensorboard_failed = True
        writer = getattr(getattr(self.tensorboard, "file_writer", None), "event_writer", None)
        where = getattr(writer, "_file_name", None) or next(self.tensorboard_dir.glob("events.out.tfevents.*"),
                                                            self.tensorboard_dir)
        return RunError(f"could not write the TensorBoard events file {where} (log.sinks: tensorboard): "
                        f"{e.strerror or e}{full_disk_hint(e)}")

    def close(self) -> None:
        self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            try:
                self.tensorboard.close()  # flushes what is queued: the disk may be full here too
            except OSError as e:
                if not self._tensorboard_failed:  # else: reported already, and the run is ending on it
                    raise self._tensorboard_error(e) from None


def _quiet_tensorboard_writer_threads() -> None:
    """tensorboard writes events in a thread of its own; a write that fails there is printed as that thread's
    traceback and then raised again from the next add_scalar or flush, where MetricsLogger reports it in one line.
    The thread's traceback goes (once per process: a hook over threading.excepthook for that thread class only)."""
    import threading

    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:  # another tensorboard: its tracebacks stay
        return
    previous = threading.excepthook
    if getattr(previous, "longtune_tensorboard", False):
        return

    def hook(args):
        if not (isinstance(args.thread, _AsyncWriterThread) and issubclass(args.exc_type, Exception)):
            previous(args)

    hook.longtune_tensorboard = True
    threading.excepthook = hook


_SHOWN = [
    ("loss", "loss {:.4g}"),
    ("lr", "lr {:.2e}"),
    ("grad_norm", "gnorm {:.3f}"),
    ("tokens_per_s", "{:,.0f} tok/s"),
    ("step_time_s", "{:.2f} s/step"),
    ("time_plan_s", "plan {:.2f} s"),
    ("tflops", "{:.2f} TFLOPS"),
    ("mfu", "MFU {:.1%}"),
    ("gpu_peak_allocated_gb", "gpu {:.2f} GB"),
    ("host_peak_rss_gb", "host {:.2f} GB"),
    ("offload_wait_s", "offload wait {:.2f} s"),
    ("nvme_read_gb", "nvme read {:.2f} GB"),
    ("nvme_write_gb", "write {:.2f} GB"),
    ("passkey_acc", "passkey acc {:.2f}"),
    ("passkey_loss", "passkey loss {:.4g}"),
]


def format_line(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}"]
    parts += [fmt.format(record[k]) for k, fmt in _SHOWN if record.get(k) is not None]
    return " | ".join(parts)


# Dense bf16 peak FLOP/s, for MFU; devices not listed get no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H20": 148e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def train_flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """6N for the matmuls plus causal attention (forward + backward), per token."""
    return 6 * n_params + 6 * n_layers * hidden * seq_len


