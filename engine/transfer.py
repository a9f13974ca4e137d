"""Links: host page -> device slot copies, off the compute path (the live side of ``cache.step.Link``).

CUDA (:class:`CudaLink`): copies run on a dedicated stream from pinned pages; each
copy records an event and the compute stream waits on exactly the events it
needs, so the host never blocks. After every wave's compute the step calls
``fence()``: the copy stream waits for that compute before its next copy, since
the next copy may overwrite a slot the wave's kernels have not read yet. Stall is
the time the compute stream spent waiting, measured by a pair of timing events
and read back later, without blocking.

CPU with an emulated link (:class:`ThreadLink`): a worker thread performs the
copies in priority order (demand before prefetch, FIFO within a class), paced
like a link of given bandwidth and per-copy latency, so overlap, stalls and
prefetch timing are real, measurable and testable without a GPU.

CPU without one: no link at all. A slot is the host page itself
(``cache.step.InstantLink`` with the store's pages as the slot rows): no slot
memory, no copies.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Sequence

import torch

from cache.step import StallClock

DEMAND = 0
PREFETCH = 1


class CopyHandle:
    __slots__ = ("_done", "event", "key", "kind", "nbytes", "slot", "state")

    def __init__(self, key, slot: int, nbytes: int, kind: int) -> None:
        self.key = key
        self.slot = slot
        self.nbytes = nbytes
        self.kind = kind
        self.state = "queued"  # queued | running | done | cancelled
        self._done = threading.Event()
        self.event = None  # the copy's CUDA event


class ThreadLink:
    """CPU path with an emulated link: copies on a worker thread, paced like PCIe."""

    def __init__(self, store, slots: torch.Tensor, link_gbps: float | None = None, latency_us: float = 0.0) -> None:
        self.store = store
        self.slots = slots
        self.bytes_per_second = link_gbps * 1e9 if link_gbps else None
        self.latency = latency_us * 1e-6
        self._heap: list[tuple[int, int, CopyHandle]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="moepager-copy", daemon=True)
        self._worker.start()

    def demand(self, key, slot: int) -> CopyHandle:
        return self._queue(key, slot, DEMAND)

    def prefetch(self, key, slot: int) -> CopyHandle:
        return self._queue(key, slot, PREFETCH)

    def _queue(self, key, slot: int, kind: int) -> CopyHandle:
        handle = CopyHandle(key, slot, self.store.page_bytes, kind)
        with self._cv:
            heapq.heappush(self._heap, (kind, next(self._seq), handle))
            self._cv.notify()
        return handle

    def landed(self, handle: CopyHandle) -> bool:
        return handle._done.is_set()

    def cancel(self, handle: CopyHandle) -> bool:
        """Cancel a queued copy; False when it already started (it will finish)."""
        with self._cv:
            if handle.state == "queued":
                handle.state = "cancelled"
                handle._done.set()
                return True
        return False

    def promote(self, handle: CopyHandle) -> None:
        """A queued prefetch is needed now: move it ahead of the other prefetches."""
        with self._cv:
            if handle.state == "queued" and handle.kind != DEMAND:
                handle.kind = DEMAND
                heapq.heappush(self._heap, (DEMAND, next(self._seq), handle))  # the old entry is skipped
                self._cv.notify()

    def wait(self, handles: Sequence[CopyHandle], clock: StallClock, phase: int) -> None:
        t0 = time.perf_counter()
        for handle in handles:
            handle._done.wait()
        clock.add(phase, time.perf_counter() - t0)

    def fence(self) -> None:
        return None  # CPU compute is synchronous: nothing can still be reading a slot

    def drain(self, handles: Sequence[CopyHandle]) -> None:
        for handle in handles:
            handle._done.wait()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed and not self._heap:
                    return
                _, _, handle = heapq.heappop(self._heap)
                if handle.state != "queued":
                    continue  # cancelled, or an older entry of a promoted copy
                handle.state = "running"
            start = time.perf_counter()
            key = handle.key
            self.slots[handle.slot].copy_(self.store.page(key.layer, key.expert))
            if self.bytes_per_second:
                deadline = start + self.latency + handle.nbytes / self.bytes_per_second
                while (left := deadline - time.perf_counter()) > 0:
                    time.sleep(left)
            handle.state = "done"
            handle._done.set()


class TorchCuda:
    """The few CUDA calls :class:`CudaLink` makes; a test double stands in for it on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def stream(self):
        return torch.cuda.Stream(device=self.device)

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)  # src is pinned: a true async DMA


class EventSpan:
    """How long the compute stream waited: the time between two events around its waits."""

    __slots__ = ("end", "start")

    def __init__(self, start, end) -> None:
        self.start, self.end = start, end

    def ready(self) -> bool:
        return bool(self.end.query())

    def seconds(self) -> float:
        if not self.end.query():
            self.end.synchronize()  # only when settling blocks (drain), never on the hot path
        return self.start.elapsed_time(self.end) / 1e3


class CudaLink:
    """GPU path: one copy stream, one event per copy, a compute fence per wave; the host never waits."""

    def __init__(self, store, slots: torch.Tensor, api: TorchCuda) -> None:
        self.store = store
        self.slots = slots
        self.api = api
        self.stream = api.stream()
        self._fence = None  # event after the last computed wave, not yet waited on by the copy stream

    def demand(self, key, slot: int) -> CopyHandle:
        return self._copy(key, slot, DEMAND)

    def prefetch(self, key, slot: int) -> CopyHandle:
        return self._copy(key, slot, PREFETCH)

    def _copy(self, key, slot: int, kind: int) -> CopyHandle:
        handle = CopyHandle(key, slot, self.store.page_bytes, kind)
        stream = self.stream
        if self._fence is not None:
            stream.wait_event(self._fence)  # the slot may still be read by queued compute
            self._fence = None  # stream order covers every later copy
        self.api.copy(self.slots[slot], self.store.page(key.layer, key.expert), stream)
        handle.event = self.api.event()
        handle.event.record(stream)
        handle.state = "running"
        return handle

    def landed(self, handle: CopyHandle) -> bool:
        return bool(handle.event.query())

    def cancel(self, handle: CopyHandle) -> bool:
        return False  # an issued DMA cannot be recalled; the stream orders later copies after it

    def promote(self, handle: CopyHandle) -> None:
        return None  # already issued on the copy stream

    def wait(self, handles: Sequence[CopyHandle], clock: StallClock, phase: int) -> None:
        compute = self.api.current_stream()
        start = self.api.event(timing=True)
        start.record(compute)
        for handle in handles:
            compute.wait_event(handle.event)
        end = self.api.event(timing=True)
        end.record(compute)
        clock.defer(phase, EventSpan(start, end))

    def fence(self) -> None:
        event = self.api.event()
        event.record(self.api.current_stream())
        self._fence = event

    def drain(self, handles: Sequence[CopyHandle]) -> None:
        for handle in handles:
            handle.event.synchronize()

    def close(self) -> None:
        self.stream.synchronize()
