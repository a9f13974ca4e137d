"""The transfer engine: host page -> device slot copies, off the compute path.

CUDA: copies run on a dedicated stream from pinned pages; each copy records an
event and the compute stream waits on exactly the events it needs. Before a slot
is overwritten the copy stream waits for the compute that last read it.

CPU: the "device" is CPU memory, and a worker thread performs the copies in
priority order (demand before prefetch, FIFO within a class). It can emulate a
link of given bandwidth and per-copy latency, so overlap, stalls and prefetch
timing are real, measurable and testable without a GPU.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time

import torch

DEMAND = 0
PREFETCH = 1


class CopyHandle:
    __slots__ = ("_done", "dst", "event", "key", "kind", "nbytes", "slot", "src", "state")

    def __init__(self, key, slot: int, nbytes: int, kind: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.key = key
        self.slot = slot
        self.nbytes = nbytes
        self.kind = kind
        self.state = "queued"  # queued | running | done | cancelled
        self._done = threading.Event()
        self.event = None  # torch.cuda.Event on CUDA
        self.src = src
        self.dst = dst

    def done(self) -> bool:
        if self.event is not None:
            return bool(self.event.query())
        return self._done.is_set()


class ThreadTransferEngine:
    """CPU path: copies on a worker thread, optionally paced like a PCIe link."""

    def __init__(self, link_gbps: float | None = None, latency_us: float = 0.0) -> None:
        self.bytes_per_second = link_gbps * 1e9 if link_gbps else None
        self.latency = latency_us * 1e-6
        self._heap: list[tuple[int, int, CopyHandle]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="moepager-copy", daemon=True)
        self._worker.start()

    def copy(self, key, slot: int, src: torch.Tensor, dst: torch.Tensor, kind: int) -> CopyHandle:
        handle = CopyHandle(key, slot, src.numel() * src.element_size(), kind, src, dst)
        with self._cv:
            heapq.heappush(self._heap, (kind, next(self._seq), handle))
            self._cv.notify()
        return handle

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

    def wait(self, handle: CopyHandle) -> None:
        handle._done.wait()

    def before_overwrite(self) -> None:
        return None  # CPU compute is synchronous: nothing can still be reading a slot

    def after_compute(self) -> None:
        return None

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
            handle.dst.copy_(handle.src)
            if self.bytes_per_second:
                deadline = start + self.latency + handle.nbytes / self.bytes_per_second
                while (left := deadline - time.perf_counter()) > 0:
                    time.sleep(left)
            handle.src = handle.dst = None
            handle.state = "done"
            handle._done.set()


class CudaTransferEngine:
    """GPU path: one copy stream, one event per copy, compute waits on events only."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._compute_done = None

    def copy(self, key, slot: int, src: torch.Tensor, dst: torch.Tensor, kind: int) -> CopyHandle:
        handle = CopyHandle(key, slot, src.numel() * src.element_size(), kind, src, dst)
        with torch.cuda.stream(self.stream):
            if self._compute_done is not None:
                self.stream.wait_event(self._compute_done)  # the slot may still be read by queued compute
            dst.copy_(src, non_blocking=True)
            handle.event = torch.cuda.Event()
            handle.event.record(self.stream)
        handle.state = "running"
        handle.src = handle.dst = None
        return handle

    def cancel(self, handle: CopyHandle) -> bool:
        return False  # an issued DMA cannot be recalled; the stream orders later copies after it

    def promote(self, handle: CopyHandle) -> None:
        return None  # already issued on the copy stream

    def wait(self, handle: CopyHandle) -> None:
        # Block the host only on this copy: the stall is measured by the caller around this call.
        handle.event.synchronize()
        torch.cuda.current_stream(self.device).wait_event(handle.event)

    def before_overwrite(self) -> None:
        return None

    def after_compute(self) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._compute_done = event

    def close(self) -> None:
        self.stream.synchronize()


class InlineTransferEngine:
    """CPU path without link emulation: a copy is a memcpy done at issue time.

    With no link to model, a worker thread would only add hand-off latency.
    """

    def copy(self, key, slot: int, src: torch.Tensor, dst: torch.Tensor, kind: int) -> CopyHandle:
        handle = CopyHandle(key, slot, src.numel() * src.element_size(), kind, src, dst)
        dst.copy_(src)
        handle.src = handle.dst = None
        handle.state = "done"
        handle._done.set()
        return handle

    def cancel(self, handle: CopyHandle) -> bool:
        return False

    def promote(self, handle: CopyHandle) -> None:
        return None

    def wait(self, handle: CopyHandle) -> None:
        return None

    def before_overwrite(self) -> None:
        return None

    def after_compute(self) -> None:
        return None

    def close(self) -> None:
        return None


def build_transfer_engine(device: torch.device, link_gbps: float | None, latency_us: float):
    if device.type == "cuda":
        return CudaTransferEngine(device)
    if link_gbps is None and latency_us == 0:
        return InlineTransferEngine()
    return ThreadTransferEngine(link_gbps, latency_us)
