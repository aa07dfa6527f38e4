"""Asynchronous copies between the device and the host, one mover per direction, and how to wait for them.

On a GPU a mover is a CUDA stream: a copy is enqueued after an event recorded on the compute stream (so it
reads what compute wrote), and returns an event; `wait` makes the compute stream wait for that event (the
host does not block) and measures, with a pair of events, how long the compute stream stalled. Pinned host
memory makes the copies truly asynchronous.

Without a GPU the device is the CPU: a mover is one worker thread (torch's memcpy releases the GIL), a copy
returns a future, and `wait` blocks and measures the time blocked. The same runtime code drives both, so every
branch of it runs in the CPU tests. `delay_s` slows every copy of a CPU mover down, to test the overlap logic
with a tier slower than compute.

`lagging=True` (CPU only) is the lagging-device mode: a copy runs as late as a CUDA stream behind compute may
run it. It is queued, not started, and the queue runs in order only when somebody needs a copy done: compute
(`wait`), the host (`finish`), or a later copy that must come after it (`after`). On a CPU every copy is
otherwise done long before the host moves on, so code that reads a copy's destination, or writes its source,
without waiting for it, is right on a CPU and wrong on a GPU; in this mode it is wrong on the CPU too.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Optional

import torch

from .live_bytes import faking


class InlineExecutor(Executor):
    """Runs each job when it is submitted, on the submitting thread. A dry run's fake tensors may not be used by
    two threads at once (torch's FakeTensorMode is not thread-safe), so its workers run inline."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 -- the waiter gets it, as from a pool's future
            future.set_exception(e)
        return future


def worker_pool(name: str, workers: int = 1, **kwargs) -> Executor:
    """The runtime's worker threads: `workers` threads named longtune-<name>; inline in a dry run."""
    if faking():
        return InlineExecutor()
    return ThreadPoolExecutor(workers, thread_name_prefix=f"longtune-{name}", **kwargs)


class Ticket:
    """A copy in flight: an event on a GPU, a future on the CPU; `done` is set once waited for. `lagging`: the
    lagging mover whose queue runs it (only when asked to)."""

    __slots__ = ("event", "future", "done", "lagging")

    def __init__(self, event=None, future: Optional[Future] = None, lagging: Optional["Mover"] = None):
        self.event, self.future, self.done, self.lagging = event, future, False, lagging


def settle(ticket: Ticket) -> None:
    """Block the host until a CPU ticket's work is done (running a lagging mover's queue up to it)."""
    if ticket.lagging is not None:
        ticket.lagging._run_until(ticket)
    ticket.future.result()


class Mover:
    def __init__(self, device: torch.device, name: str, delay_s: float = 0.0, lagging: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.name, self.delay_s = name, delay_s
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.lagging = lagging and not self.cuda  # a GPU lags by itself
        self._pool = None if self.cuda or self.lagging else worker_pool(name)
        self._queue: collections.deque = collections.deque()  # lagging: (ticket, copy) not run yet, in order
        self._queue_lock = threading.RLock()  # the host and an I/O thread may both need a copy done
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

        def run():
            if after is not None:
                settle(after)
            if self.delay_s:
                time.sleep(self.delay_s)
            dst.copy_(src)

        if self.lagging:
            ticket = Ticket(future=Future(), lagging=self)
            with self._queue_lock:
                self._queue.append((ticket, run))
            return ticket
        return Ticket(future=self._pool.submit(run))

    def _run_until(self, ticket: Optional[Ticket] = None) -> None:
        """Lagging mode: run the queued copies in order, up to `ticket` (all of them: None)."""
        with self._queue_lock:
            while self._queue and (ticket is None or not ticket.future.done()):
                queued, run = self._queue.popleft()
                try:
                    run()
                except BaseException as e:  # noqa: BLE001 -- the waiter gets it, as from a pool's future
                    queued.future.set_exception(e)
                else:
                    queued.future.set_result(None)

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
            settle(ticket)
            self.wait_s += time.perf_counter() - start
        ticket.done = True

    def finish(self, ticket: Optional[Ticket]) -> None:
        """Block the host until the ticket's copy is done (before its source or destination is reused)."""
        if ticket is None:
            return
        if self.cuda:
            ticket.event.synchronize()
        else:
            settle(ticket)

    def stall_s(self) -> float:
        """Seconds compute waited on this mover so far (GPU: synchronises the recorded event pairs)."""
        if self._stalls:
            for before, after in self._stalls:
                after.synchronize()
                self.wait_s += before.elapsed_time(after) / 1e3
            self._stalls = []
        return self.wait_s

    def close(self) -> None:
        self._run_until(None)  # lagging: what nobody waited for still lands, as on a GPU at the next sync
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        elif self.stream is not None:
            self.stream.synchronize()
