"""The expert-cache state machine shared by the live engine and the offline simulator.

Design: the engine's slot pool owns memory and copies; the simulator owns a clock
and a link model; both ask this class which experts hit, which slot each miss
goes to and which expert it evicts. Because the decision logic lives in exactly
one place, a trace replayed offline gives the same hits as the live run that
recorded it.

Scopes: with ``scope="layer"`` every MoE layer owns a fixed range of slots
(capacities may differ per layer); with ``scope="global"`` all layers compete for
one pool. A step's needed experts are protected from eviction; when a step needs
more experts than its scope holds, it is split into waves that each fit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from cache.base import EvictionPolicy, ExpertKey


@dataclass
class StepResult:
    """One wave of one layer's step: experts that can be computed together."""

    hits: list[tuple[ExpertKey, int]] = field(default_factory=list)  # (key, slot)
    misses: list[tuple[ExpertKey, int, ExpertKey | None]] = field(default_factory=list)  # (key, slot, evicted)

    def slots(self) -> dict[int, int]:
        """expert id -> slot for every expert of the wave."""
        out = {k.expert: s for k, s in self.hits}
        out.update({k.expert: s for k, s, _ in self.misses})
        return out


class ExpertCache:
    def __init__(
        self,
        policy: EvictionPolicy,
        num_layers: int,
        capacities: Sequence[int],
        scope: str = "layer",
        num_experts: int | None = None,
    ) -> None:
        if scope not in ("layer", "global"):
            raise ValueError(f"cache scope must be 'layer' or 'global', got {scope!r}")
        if scope == "layer" and len(capacities) != num_layers:
            raise ValueError(f"layer scope needs one capacity per layer ({num_layers}), got {len(capacities)}")
        if scope == "global" and len(capacities) != 1:
            raise ValueError("global scope takes exactly one capacity")
        if any(c < 1 for c in capacities):
            raise ValueError(f"every cache scope needs at least one slot, got {list(capacities)}")
        self.policy = policy
        self.num_layers = num_layers
        self.scope = scope
        self.capacities = list(capacities)
        self.num_slots = sum(self.capacities)
        # Slot ranges per scope: layer l owns [start_l, start_l + cap_l).
        self._free: list[list[int]] = []
        start = 0
        for cap in self.capacities:
            self._free.append(list(range(start + cap - 1, start - 1, -1)))  # pop() gives lowest first
            start += cap
        # A scope with a slot for every expert it serves never evicts: its policy has nothing to decide,
        # so its accesses skip the policy's bookkeeping (``num_experts`` per layer, when given).
        per_scope = None if num_experts is None else num_experts * (1 if scope == "layer" else num_layers)
        self._holds_all = [per_scope is not None and cap >= per_scope for cap in self.capacities]
        self._resident: list[dict[ExpertKey, int]] = [{} for _ in self.capacities]  # per scope: key -> slot
        self._where: dict[ExpertKey, int] = {}  # key -> slot, all scopes
        self._key_cache: dict[int, dict[int, ExpertKey]] = {}
        # Plain-int counters, exported by the engine / simulator outside the hot path.
        self.queries = [0] * num_layers
        self.hits = [0] * num_layers

    # -- queries -------------------------------------------------------------
    def scope_of(self, layer: int) -> int:
        return layer if self.scope == "layer" else 0

    def capacity(self, layer: int) -> int:
        return self.capacities[self.scope_of(layer)]

    def slot_of(self, key: ExpertKey) -> int | None:
        return self._where.get(key)

    def is_resident(self, key: ExpertKey) -> bool:
        return key in self._where

    def resident(self, layer: int | None = None) -> list[ExpertKey]:
        if layer is None:
            return list(self._where)
        return [k for k in self._resident[self.scope_of(layer)] if k.layer == layer]

    def has_free_slot(self, layer: int) -> bool:
        return bool(self._free[self.scope_of(layer)])

    def used_slots(self) -> int:
        return len(self._where)

    # -- the step --------------------------------------------------------------
    def access(
        self,
        layer: int,
        experts: Iterable[int],
        step: int,
        pinned: AbstractSet[ExpertKey] = frozenset(),
    ) -> list[StepResult]:
        """Make ``experts`` (unique ids) of ``layer`` resident, in waves that fit the scope.

        Resident experts go first so they are used before anything could evict
        them. ``pinned`` keys (e.g. copies in flight) are never chosen as victims.
        """
        keys = self.keys_of(layer, experts)
        scope = layer if self.scope == "layer" else 0
        if not pinned and len(keys) <= self.capacities[scope]:
            return [self._access_one_wave(layer, scope, keys, step)]
        # Every pinned key stays protected in every wave (a copy in flight must never lose its slot),
        # so each wave gets the slots the pinned keys leave.
        pinned_here = sum(1 for k in pinned if k in self._where and self.scope_of(k.layer) == scope)
        cap = max(self.capacities[scope] - pinned_here, 1)
        hits = [k for k in keys if k in self._where]
        misses = [k for k in keys if k not in self._where]
        ordered = hits + misses
        waves = [ordered[i : i + cap] for i in range(0, len(ordered), cap)]
        results = []
        for wave in waves:
            protected = set(wave) | set(pinned)
            res = StepResult()
            for key in wave:
                slot = self._where.get(key)
                hit = slot is not None
                self.queries[layer] += 1
                self.policy.on_access(key, hit, step)
                if hit:
                    self.hits[layer] += 1
                    res.hits.append((key, slot))
                    continue
                slot, evicted = self._make_room(scope, protected)
                self._place(scope, key, slot)
                res.misses.append((key, slot, evicted))
            results.append(res)
        return results

    def bypass(self, layer: int, experts: Iterable[int], step: int) -> None:
        """Count misses that are served without a slot (computed where the expert lives, on the host).

        The policy still sees the accesses, so its statistics stay true; nothing is inserted.
        """
        keys = self.keys_of(layer, experts)
        for key in keys:
            self.policy.on_access(key, False, step)
        self.queries[layer] += len(keys)

    def keys_of(self, layer: int, experts: Iterable[int]) -> list[ExpertKey]:
        """The keys of ``experts`` of ``layer``, interned."""
        # Interned keys: building namedtuples is a large share of the simulator's inner loop.
        cache = self._key_cache.get(layer)
        if cache is None:
            cache = self._key_cache[layer] = {}
        out = []
        for e in experts:
            key = cache.get(e)
            if key is None:
                key = cache[e] = ExpertKey(layer, int(e))
            out.append(key)
        return out

    def _access_one_wave(self, layer: int, scope: int, keys: list[ExpertKey], step: int) -> StepResult:
        """The common case of :meth:`access` (nothing pinned, one wave), with the same decisions."""
        where = self._where
        on_access = _ignore if self._holds_all[scope] else self.policy.on_access
        res = StepResult()
        misses = []
        for key in keys:
            slot = where.get(key)
            if slot is None:
                misses.append(key)
            else:
                on_access(key, True, step)
                res.hits.append((key, slot))
        if misses:
            protected = set(keys)
            for key in misses:
                on_access(key, False, step)
                slot, evicted = self._make_room(scope, protected)
                self._place(scope, key, slot)
                res.misses.append((key, slot, evicted))
        self.queries[layer] += len(keys)
        self.hits[layer] += len(keys) - len(misses)
        return res

    def insert(self, key: ExpertKey, protected: AbstractSet[ExpertKey]) -> tuple[int, ExpertKey | None] | None:
        """Insert ``key`` without an access (a prefetch). None when every resident key is protected."""
        if key in self._where:
            return None
        scope = self.scope_of(key.layer)
        if not self._free[scope] and all(k in protected for k in self._resident[scope]):
            return None
        slot, evicted = self._make_room(scope, protected)
        self._place(scope, key, slot)
        return slot, evicted

    def evict(self, key: ExpertKey) -> int | None:
        """Drop ``key`` (e.g. a cancelled prefetch); returns the freed slot."""
        slot = self._where.pop(key, None)
        if slot is None:
            return None
        scope = self.scope_of(key.layer)
        del self._resident[scope][key]
        self._free[scope].append(slot)
        self.policy.on_evict(key)
        return slot

    def start_request(self, request_id: object = None) -> None:
        """A new request begins: forwarded to policies that track requests (``on_request_start``)."""
        hook = getattr(self.policy, "on_request_start", None)
        if hook is not None:
            hook(request_id)

    def set_policy(self, policy: EvictionPolicy) -> None:
        """Swap the policy at run time; the new one learns the resident set as fresh inserts."""
        self.policy = policy
        for key in self._where:
            policy.on_insert(key)

    # -- internals -------------------------------------------------------------

    def _make_room(self, scope: int, protected: AbstractSet[ExpertKey]) -> tuple[int, ExpertKey | None]:
        if self._free[scope]:
            return self._free[scope].pop(), None
        victim = self.policy.victim(self._resident[scope].keys(), protected)
        slot = self._resident[scope].pop(victim)
        del self._where[victim]
        self.policy.on_evict(victim)
        return slot, victim

    def _place(self, scope: int, key: ExpertKey, slot: int) -> None:
        self._resident[scope][key] = slot
        self._where[key] = slot
        self.policy.on_insert(key)


def _ignore(key: ExpertKey, hit: bool, step: int) -> None:
    return None
