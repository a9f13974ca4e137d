"""Frequency-weighted recency (LFRU): recency, with a bonus for experts used often.

Design: an expert's priority is the layer tick of its last use plus ``weight``
ticks per past use, capped at ``max_count`` uses so a once-hot expert cannot pin
its slot forever. ``weight=0`` is exactly LRU; a large weight approaches LFU.
In MoE decode the working set drifts slowly, and a few experts per layer are hot
for a whole request: the bonus keeps those through a burst of one-off experts
that would flush them out of an LRU.
"""

from __future__ import annotations

from collections.abc import Collection
from collections.abc import Set as AbstractSet

from cache._clock import LayerClock
from cache.base import ExpertKey, lowest_ranked, register_policy


@register_policy("lfru")
class LFRUPolicy:
    def __init__(self, weight: float = 2.0, max_count: int = 8) -> None:
        if weight < 0 or max_count < 0:
            raise ValueError("lfru weight and max_count must be >= 0")
        self.weight = float(weight)
        self.max_count = int(max_count)
        self._clock = LayerClock()
        self._count: dict[ExpertKey, int] = {}
        self._last_tick: dict[ExpertKey, int] = {}
        self._seq: dict[ExpertKey, int] = {}  # tie-break: order of last touch
        self._n = 0

    def on_access(self, key: ExpertKey, hit: bool, step: int) -> None:
        now = self._clock.advance(key.layer, step)
        self._count[key] = self._count.get(key, 0) + 1
        self._last_tick[key] = now
        self._n += 1
        self._seq[key] = self._n

    def on_insert(self, key: ExpertKey) -> None:
        self._n += 1
        self._seq[key] = self._n
        self._last_tick.setdefault(key, self._clock.now(key.layer))

    def on_evict(self, key: ExpertKey) -> None:
        return None

    def priority(self, key: ExpertKey) -> float:
        bonus = self.weight * min(self._count.get(key, 0), self.max_count)
        return self._last_tick.get(key, 0) + bonus

    def victim(self, resident: Collection[ExpertKey], protected: AbstractSet[ExpertKey]) -> ExpertKey:
        return lowest_ranked(resident, protected, lambda key: (self.priority(key), self._seq.get(key, 0)))
