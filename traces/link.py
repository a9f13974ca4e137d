"""A modelled host-to-device link on a virtual clock: the simulator's ``cache.step.Link``.

Design: one copy engine serves copies one at a time, each taking
``latency + expert_bytes / bandwidth``. Demand copies (misses the current layer
waits for) go before every prefetch that has not started; prefetches are FIFO
among themselves; a started copy is never pre-empted. Work is committed lazily:
a queued prefetch is only fixed in time once a later event proves it started
before that event, which is what lets a demand copy overtake it.

The clock moves only when the step waits (stall), after each computed wave
(``compute_seconds``) and for host-computed experts (:meth:`compute`), so
timing is deterministic. With a ``mover`` the live
engine can run on this very link (the bytes move at issue time, the timing is
the model's): that is how live and simulated prefetch outcomes are compared
under a link whose copies take a fixed number of layer computes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from cache.base import ExpertKey
from cache.step import StallClock


class TimedCopy:
    __slots__ = ("finish", "issued", "key")

    def __init__(self, key: ExpertKey, issued: float) -> None:
        self.key = key
        self.issued = issued
        self.finish: float | None = None  # set once the copy is committed to the engine


class TimedLink:
    def __init__(self, seconds_per_copy: float, compute_seconds: float = 0.0,
                 mover: Callable[[ExpertKey, int], None] | None = None) -> None:
        self.seconds_per_copy = float(seconds_per_copy)
        self.compute_seconds = float(compute_seconds)
        self.mover = mover
        self.now = 0.0
        self.free_at = 0.0  # when the last committed copy finishes
        self.pending: deque[TimedCopy] = deque()  # prefetches not started
        self.copies = 0  # started copies (demand and prefetch)

    # -- the model ---------------------------------------------------------------------
    def advance(self, t: float) -> None:
        """Start every queued prefetch that begins before ``t``."""
        dur = self.seconds_per_copy
        while self.pending:
            copy = self.pending[0]
            start = max(self.free_at, copy.issued)
            if start >= t:
                break
            self.pending.popleft()
            self.free_at = copy.finish = start + dur
            self.copies += 1

    def _commit_now(self, copy: TimedCopy) -> TimedCopy:
        self.advance(self.now)
        self.free_at = copy.finish = max(self.free_at, self.now) + self.seconds_per_copy
        self.copies += 1
        return copy

    # -- cache.step.Link ----------------------------------------------------------------
    def demand(self, key: ExpertKey, slot: int) -> TimedCopy:
        if self.mover is not None:
            self.mover(key, slot)
        return self._commit_now(TimedCopy(key, self.now))

    def prefetch(self, key: ExpertKey, slot: int) -> TimedCopy:
        if self.mover is not None:
            self.mover(key, slot)
        copy = TimedCopy(key, self.now)
        self.pending.append(copy)
        return copy

    def landed(self, copy: TimedCopy) -> bool:
        self.advance(self.now)
        return copy.finish is not None and copy.finish <= self.now

    def cancel(self, copy: TimedCopy) -> bool:
        """Drop a queued prefetch that has not started; False if it already started."""
        self.advance(self.now)
        if copy.finish is None:
            self.pending.remove(copy)
            return True
        return False

    def promote(self, copy: TimedCopy) -> None:
        """A queued prefetch is needed now: it becomes a demand copy, ahead of the other prefetches."""
        self.advance(self.now)
        if copy.finish is None:
            self.pending.remove(copy)
            self._commit_now(copy)

    def wait(self, handles: Sequence[TimedCopy], clock: StallClock, phase: int) -> None:
        self.advance(self.now)
        ready = self.now
        for copy in handles:
            if copy.finish is None:  # waited on without a promote: it runs as a demand copy
                self.pending.remove(copy)
                self._commit_now(copy)
            ready = max(ready, copy.finish)
        clock.add(phase, ready - self.now)
        self.now = ready

    def fence(self) -> None:
        self.now += self.compute_seconds  # one wave computed

    def compute(self, seconds: float) -> None:
        """Work off the link (host-computed experts): the clock moves, queued copies progress."""
        self.now += seconds

    def drain(self, handles: Sequence[TimedCopy]) -> None:
        return None

    def finish(self) -> None:
        """End of the replay: prefetches still queued never moved."""
        self.advance(self.now)

    def close(self) -> None:
        return None
