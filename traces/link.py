"""An event-timed model of one host-to-device copy engine, for the simulator.

Design: one copy engine serves copies one at a time, each taking
``latency + expert_bytes / bandwidth``. Demand copies (misses the current layer
waits for) go before every prefetch that has not started; prefetches are FIFO
among themselves; a started copy is never pre-empted. Work is committed lazily:
a queued prefetch is only fixed in time once a later event proves it started
before that event, which is what lets a demand copy overtake it.
"""

from __future__ import annotations

from collections import deque

from cache.base import ExpertKey


class CopyEngine:
    def __init__(self, seconds_per_copy: float) -> None:
        self.seconds_per_copy = float(seconds_per_copy)
        self.free_at = 0.0  # when the last committed copy finishes
        self.pending: deque[tuple[ExpertKey, float]] = deque()  # prefetches not started: (key, issue time)
        self.in_flight: dict[ExpertKey, float] = {}  # committed prefetches: key -> finish time
        self.copies = 0  # started copies (demand and prefetch)

    def advance(self, t: float) -> None:
        """Start every queued prefetch that begins before ``t``."""
        dur = self.seconds_per_copy
        while self.pending:
            key, issued = self.pending[0]
            start = max(self.free_at, issued)
            if start >= t:
                break
            self.pending.popleft()
            self.free_at = start + dur
            self.in_flight[key] = self.free_at
            self.copies += 1

    def landed(self, t: float) -> list[ExpertKey]:
        """Prefetches finished by ``t`` (removed from tracking)."""
        done = [k for k, f in self.in_flight.items() if f <= t]
        for k in done:
            del self.in_flight[k]
        return done

    def demand(self, t: float, count: int) -> float:
        """Queue ``count`` demand copies at ``t`` ahead of queued prefetches; returns when the last ends."""
        self.advance(t)
        if count <= 0:
            return t
        start = max(self.free_at, t)
        self.free_at = start + count * self.seconds_per_copy
        self.copies += count
        return self.free_at

    def prefetch(self, key: ExpertKey, t: float) -> None:
        self.pending.append((key, t))

    def cancel(self, key: ExpertKey) -> bool:
        """Drop a queued prefetch that has not started; False if it already started."""
        for i, (k, _) in enumerate(self.pending):
            if k == key:
                del self.pending[i]
                return True
        return False

    def promote(self, key: ExpertKey) -> bool:
        """A queued prefetch is needed now: drop it from the queue (the caller demands it instead)."""
        return self.cancel(key)

    def busy(self) -> set[ExpertKey]:
        """Keys whose slot is being written or reserved: they must not be evicted."""
        return set(self.in_flight) | {k for k, _ in self.pending}
