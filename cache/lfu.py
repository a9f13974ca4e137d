"""Least-frequently-used eviction, with an optional decay so old counts fade.

Design: counts survive eviction (the history of an expert is what predicts its
future in MoE routing; an in-cache-only count would restart every re-fetched
expert at zero and thrash). With ``decay < 1`` a count is multiplied by
``decay`` for every tick of its layer (one tick = one forward reaching that
layer), so a formerly hot expert loses its lead after a topic change. Ties are
broken by recency (least recent first), so LFU degrades to LRU on a flat profile.
"""

from __future__ import annotations

from collections.abc import Collection
from collections.abc import Set as AbstractSet

from cache._clock import LayerClock
from cache.base import ExpertKey, lowest_ranked, register_policy


@register_policy("lfu")
class LFUPolicy:
    def __init__(self, decay: float = 1.0) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"lfu decay must be in (0, 1], got {decay}")
        self.decay = float(decay)
        self._clock = LayerClock()
        self._count: dict[ExpertKey, float] = {}
        self._tick: dict[ExpertKey, int] = {}  # layer tick of the last count update
        self._last: dict[ExpertKey, int] = {}  # step of the last access or insert (tie-break)
        self._seq = 0

    def _score(self, key: ExpertKey) -> float:
        count = self._count.get(key, 0.0)
        if self.decay == 1.0 or count == 0.0:
            return count
        return count * self.decay ** (self._clock.now(key.layer) - self._tick[key])

    def on_access(self, key: ExpertKey, hit: bool, step: int) -> None:
        now = self._clock.advance(key.layer, step)
        self._count[key] = self._score(key) + 1.0
        self._tick[key] = now
        self._seq += 1
        self._last[key] = self._seq

    def on_insert(self, key: ExpertKey) -> None:
        self._seq += 1
        self._last[key] = self._seq
        if key not in self._tick:
            self._tick[key] = self._clock.now(key.layer)

    def on_evict(self, key: ExpertKey) -> None:
        return None  # counts are kept on purpose

    def victim(self, resident: Collection[ExpertKey], protected: AbstractSet[ExpertKey]) -> ExpertKey:
        return lowest_ranked(resident, protected, lambda key: (self._score(key), self._last.get(key, 0)))
