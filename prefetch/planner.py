"""The prefetch planner: turns scored predictions into copy requests, and counts outcomes.

Design: the same planner object runs in the live engine and in the simulator, so
"useful", "wasted" and "late" mean the same thing in both. Prefetches sit below
demand copies in priority (the transfer engine orders them), never evict an
expert the current step needs (the caller passes it as ``needed_now``), and are
bounded by a byte budget of copies in flight. A prefetch reserves its slot when
issued: the cache evicts the victim at that moment, and the copy lands later.
Copies in flight are pinned while a layer's demand misses are placed, so the
planner keeps at least one slot of every cache scope free of them: a scope's
in-flight prefetches never reach its capacity (a one-slot scope gets none).

Outcomes, counted once per issued prefetch:
- useful: the expert was used after its copy had finished;
- late: it was used while its copy was still in flight (the rest of the copy is stall);
- wasted: evicted or cancelled before any use.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from cache.base import ExpertKey
from cache.manager import ExpertCache


@dataclass
class PrefetchOutcomes:
    issued: int = 0
    useful: int = 0
    wasted: int = 0
    late: int = 0
    cancelled: int = 0  # subset of wasted: cancelled while still queued or in flight

    def as_dict(self) -> dict[str, int]:
        return {"issued": self.issued, "useful": self.useful, "wasted": self.wasted, "late": self.late,
                    "cancelled": self.cancelled}


class PrefetchPlanner:
    def __init__(self, expert_bytes: int, budget_bytes: int) -> None:
        self.expert_bytes = int(expert_bytes)
        self.budget_bytes = int(budget_bytes)
        self.in_flight: set[ExpertKey] = set()  # issued, copy not finished
        self.landed: set[ExpertKey] = set()  # copy finished, not used yet
        self.outcomes = PrefetchOutcomes()

    # -- planning ----------------------------------------------------------------
    def plan(
        self,
        predictions: Iterable[tuple[ExpertKey, float]],
        cache: ExpertCache,
        needed_now: AbstractSet[ExpertKey],
    ) -> list[tuple[ExpertKey, int, ExpertKey | None]]:
        """Choose what to copy now; reserves slots in ``cache``.

        Returns ``(key, slot, evicted)`` for each copy to issue, best first. The
        caller issues the copies and calls :meth:`on_complete` when each lands.
        """
        issued = []
        budget_left = self.budget_bytes - len(self.in_flight) * self.expert_bytes
        in_flight_per_scope: dict[int, int] = {}
        for k in self.in_flight:
            scope = cache.scope_of(k.layer)
            in_flight_per_scope[scope] = in_flight_per_scope.get(scope, 0) + 1
        ranked = sorted(predictions, key=lambda p: -p[1])
        # Everything the prediction expects to use is protected: a prefetch must not evict an
        # expert (resident or landing) that the same prediction says is needed.
        wanted = {k for k, _ in ranked}
        for key, _score in ranked:
            if budget_left < self.expert_bytes:
                break
            if key in needed_now or cache.is_resident(key):
                continue
            scope = cache.scope_of(key.layer)
            if in_flight_per_scope.get(scope, 0) + 1 >= cache.capacity(key.layer):
                continue  # a demand miss of that scope must always find an unpinned slot
            protected = set(needed_now) | self.in_flight | self.landed | wanted
            placed = cache.insert(key, protected)
            if placed is None:
                continue  # every resident expert of that scope is protected
            slot, evicted = placed
            if evicted is not None:
                self.on_evict(evicted)
            self.in_flight.add(key)
            in_flight_per_scope[scope] = in_flight_per_scope.get(scope, 0) + 1
            self.outcomes.issued += 1
            budget_left -= self.expert_bytes
            issued.append((key, slot, evicted))
        return issued

    # -- outcome accounting -------------------------------------------------------
    def on_complete(self, key: ExpertKey) -> None:
        if key in self.in_flight:
            self.in_flight.discard(key)
            self.landed.add(key)

    def on_access(self, key: ExpertKey) -> None:
        """The engine/simulator needs ``key`` now (call before waiting on its copy)."""
        if key in self.landed:
            self.landed.discard(key)
            self.outcomes.useful += 1
        elif key in self.in_flight:
            self.in_flight.discard(key)
            self.outcomes.late += 1

    def on_evict(self, key: ExpertKey) -> None:
        if key in self.landed:
            self.landed.discard(key)
            self.outcomes.wasted += 1

    def stale(self, layer: int, scope_layers: int | None = None) -> list[ExpertKey]:
        """Prefetches for ``layer`` that the step just routed at ``layer`` did not use.

        Call after :meth:`on_access` for every expert of ``layer``: whatever is
        still tracked for that layer was a wrong guess for this step. Copies still
        in flight are returned so the caller can cancel them (and free their slot);
        landed ones stay resident and may still be used later (or get evicted: wasted).
        """
        return [k for k in self.in_flight if k.layer == layer]

    def on_cancel(self, key: ExpertKey) -> None:
        if key in self.in_flight:
            self.in_flight.discard(key)
            self.outcomes.wasted += 1
            self.outcomes.cancelled += 1
