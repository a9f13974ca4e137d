"""Least-recently-used eviction: the baseline every other policy is compared with."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from collections.abc import Set as AbstractSet

from cache.base import ExpertKey, register_policy


@register_policy("lru")
class LRUPolicy:
    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()  # oldest first

    def on_access(self, key: ExpertKey, hit: bool, step: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_insert(self, key: ExpertKey) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_evict(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def victim(self, resident: Collection[ExpertKey], protected: AbstractSet[ExpertKey]) -> ExpertKey:
        # Sets and dict key views answer ``in`` in O(1): no copy on the hot path.
        resident_set = resident if isinstance(resident, (AbstractSet, dict)) else set(resident)
        for key in self._order:
            if key in resident_set and key not in protected:
                return key
        for key in resident:  # resident but never seen by the policy (should not happen)
            if key not in protected:
                return key
        raise RuntimeError("no evictable expert: every resident expert is protected")
