"""Asynchronous copies between the device and the host, one mover per direction, and how to wait for them.

On a GPU a mover is a CUDA stream: a copy is enqueued after an event recorded on the compute stream (so it
reads what compute wrote), and returns an event; `wait` makes the compute stream wait for that event (the
host does not block) and measures, with a pair of events, how long the compute stream stalled. Pinned host
memory makes the copies truly asynchronous.

Without a GPU the device is the CPU: a mover is one worker thread (torch's memcpy releases the GIL), a copy
returns a future, and `wait` blocks and measures the time blocked. The same runtime code drives both, so every
branch of it runs in the CPU tests. `delay_s` slows every copy of a CPU mover down, to test the overlap logic
with a tier slower than compute.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch


class Ticket:
    """A copy in flight: an event on a GPU, a future on the CPU; `done` is set once waited for."""

    __slots__ = ("event", "future", "done")

    def __init__(self, event=None, future: Optional[Future] = None):
        self.event, self.future, self.done = event, future, False


class Mover:
    def __init__(self, device: torch.device, name: str, delay_s: float = 0.0):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.name, self.delay_s = name, delay_s
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pool = None if self.cuda else ThreadPoolExecutor(1, thread_name_prefix=f"longtune-{name}")
        self.bytes_moved = 0
        self.wait_s = 0.0  # time compute was blocked (CPU) or stalled (GPU, measured once synchronised)
        self._stalls: list[tuple] = []  # GPU: event pairs around each wait

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Optional[Ticket] = None) -> Ticket:
        """Copy src into dst once compute's work so far (and `after`: a copy, or host work such as an NVMe read)
        is done."""
        self.bytes_moved += src.numel() * src.element_size()
        if self.cuda:
            if after is not None and after.future is not None:
                after.future.result()  # host work (an NVMe read) must land before the copy is enqueued
            ready = torch.cuda.current_stream(self.device).record_event()
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                if after is not None and after.event is not None:
                    self.stream.wait_event(after.event)
                dst.copy_(src, non_blocking=True)
                # The caching allocator must not hand these blocks to compute before the copy has read/written them.
                for t in (src, dst):
                    if t.is_cuda:
                        t.record_stream(self.stream)
                return Ticket(event=self.stream.record_event())
        previous = after.future if after is not None else None

        def run():
            if previous is not None:
                previous.result()
            if self.delay_s:
                time.sleep(self.delay_s)
            dst.copy_(src)

        return Ticket(future=self._pool.submit(run))

    def wait(self, ticket: Optional[Ticket]) -> None:
        """Compute goes on only after the ticket's copy has landed."""
        if ticket is None or ticket.done:
            return
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            before = stream.record_event(torch.cuda.Event(enable_timing=True))
            stream.wait_event(ticket.event)
            self._stalls.append((before, stream.record_event(torch.cuda.Event(enable_timing=True))))
        else:
            start = time.perf_counter()
            ticket.future.result()
            self.wait_s += time.perf_counter() - start
        ticket.done = True

    def finish(self, ticket: Optional[Ticket]) -> None:
        """Block the host until the ticket's copy is done (before its source or destination is reused)."""
        if ticket is None:
            return
        if self.cuda:
            ticket.event.synchronize()
        else:
            ticket.future.result()

    def stall_s(self) -> float:
        """Seconds compute waited on this mover so far (GPU: synchronises the recorded event pairs)."""
        if self._stalls:
            for before, after in self._stalls:
                after.synchronize()
                self.wait_s += before.elapsed_time(after) / 1e3
            self._stalls = []
        return self.wait_s

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        elif self.stream is not None:
            self.stream.synchronize()
