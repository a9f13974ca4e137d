"""Belady's MIN: evict the resident expert whose next use is farthest in the future.

Offline only: it needs the whole future access sequence, so it runs in the
simulator, where it is the upper bound every online policy is measured against.

Design: the policy is given the future once, as ``(step, key)`` pairs in the
same step numbering the cache uses (one step per ``ExpertCache.access`` call,
all waves of a call sharing it). The simulator builds that list from the trace
with :func:`traces.simulate.future_accesses`; any other driver can do the same.
Each key keeps a sorted list of its use steps, and the current step is learned
from ``on_access``; a key never used again has next use at infinity. Ties (e.g.
several experts never used again) go to the least recently touched.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Collection, Iterable
from collections.abc import Set as AbstractSet

from cache.base import ExpertKey, lowest_ranked, register_policy

_NEVER = float("inf")


@register_policy("belady", offline_only=True)
class BeladyPolicy:
    needs_future = True  # tells drivers to pass ``future=``

    def __init__(self, future: Iterable[tuple[int, ExpertKey]] | None = None) -> None:
        if future is None:
            raise ValueError("the belady policy needs the future access sequence: build_policy('belady', future=...)"
                             " (offline simulation only)")
        self._uses: dict[ExpertKey, list[int]] = {}
        last = None
        for step, key in future:
            step = int(step)
            if last is not None and step < last:
                raise ValueError("belady: future accesses must be in step order")
            last = step
            key = ExpertKey(int(key[0]), int(key[1]))
            uses = self._uses.setdefault(key, [])
            if not uses or uses[-1] != step:
                uses.append(step)
        self._now = -1
        self._touch: dict[ExpertKey, int] = {}
        self._n = 0

    def next_use(self, key: ExpertKey) -> float:
        uses = self._uses.get(key)
        if not uses:
            return _NEVER
        i = bisect_right(uses, self._now)
        return uses[i] if i < len(uses) else _NEVER

    def on_access(self, key: ExpertKey, hit: bool, step: int) -> None:
        self._now = step
        self._n += 1
        self._touch[key] = self._n

    def on_insert(self, key: ExpertKey) -> None:
        self._n += 1
        self._touch[key] = self._n

    def on_evict(self, key: ExpertKey) -> None:
        return None

    def victim(self, resident: Collection[ExpertKey], protected: AbstractSet[ExpertKey]) -> ExpertKey:
        # farthest next use first; among equals the least recently touched
        return lowest_ranked(resident, protected, lambda key: (-self.next_use(key), self._touch.get(key, 0)))
