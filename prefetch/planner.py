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

A copy is issued only when it is expected to pay (``gate``, on by default). In
units of one copy's time, a candidate with chance ``p`` of being used is worth

    p * g  -  (1 - p) * (rho + delta)   (delta only when the copy must evict)

- ``p``: the predictor's score, calibrated online per score decile by what
  happened to earlier copies of that decile (used, or wasted);
- ``g``: the stall a used copy hides (1 if it landed before use, a twentieth if it
  was still in flight: it only started earlier than the demand copy would);
- ``rho``: link occupancy, the share of copies that had not landed by the next
  layer (a wasted copy then delays the demand misses queued behind it; on an
  idle link it costs nothing);
- ``delta``: the misses a copy causes while it sits unused in its slot, per copy.
  Unused copies make their scope ``u`` slots smaller, so a miss on one of the
  ``u`` experts the scope evicted last (a ghost list, as in ARC) is one a cache
  without them would have hit; it is charged to the oldest unused copy. This
  covers the expert a copy displaced and every later expert pushed out early
  because the copy held a slot. A used copy's cost ends when it is used (its
  slot then holds what a demand miss would have brought).
All four are running averages over plain counters, updated in O(1) per event, so
with a predictor that guesses badly or a link that is already the bottleneck the
planner stops copying, and with compute to spare it copies whatever is likely.
They are kept apart per phase (prefill, decode), each copy's outcome feeding the
phase that issued it: a prefill layer computes many tokens for as long as a copy
takes or longer, a decode layer one token, so a link that is idle at prefill can
be the bottleneck at decode, and the predictor's hit rate differs between the two.
Candidates go best first, so where the link has idle time a predictor that lists
more than K guesses per layer gets its runners-up copied too.

What a prefetch may displace: an expert the prediction does not name, else one it
rates below the expert being placed; never one rated at least as likely, a copy
whose step is still to come, or one in flight. A landed copy whose layer then ran
without using it was a wrong guess for that step: it stays resident (a later
token may still use it: useful) but is no longer protected, so wrong guesses do
not pile up in a scope and leave the next plans no slot to copy into.

Outcomes, counted once per issued prefetch:
- useful: the expert was used after its copy had finished;
- late: it was used while its copy was still in flight (the rest of the copy is stall);
- wasted: evicted or cancelled before any use.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from cache.base import ExpertKey
from cache.manager import ExpertCache
from cache.step import DECODE, PREFILL


class _Estimates:
    """One phase's running averages, score calibration and exploration count."""

    __slots__ = ("damage", "gain", "occupancy", "rejected", "samples", "total", "used")

    def __init__(self) -> None:
        # Pessimistic until measured: a busy link and late copies, so a bad predictor costs nothing up
        # front; copies issued to explore (a logarithmic number of rejected candidates) show otherwise.
        self.occupancy = 1.0  # rho
        self.gain = 0.05  # g
        self.damage = 0.0  # delta
        self.samples = {"occupancy": 1, "gain": 1, "damage": 1}
        self.used = [0.0] * 10
        self.total = [0.0] * 10
        self.rejected = 0


def _explores(est: _Estimates) -> bool:
    """Whether the ``est.rejected``-th candidate the gate turned down is copied all the same, to measure.

    The 1st, 2nd, 4th, 8th, ...: a logarithmic number. Once the link is measured busy (rho >= 1/2
    over a few copies, not the pessimistic start) an unused copy costs about one copy of stall, so
    then only the 4th, 16th, 64th, ...
    """
    rejected = est.rejected
    if rejected & (rejected - 1):
        return False
    busy = est.occupancy >= 0.5 and est.samples["occupancy"] > 3
    return not busy or rejected.bit_length() % 2 == 1


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
    def __init__(self, expert_bytes: int, budget_bytes: int, *, gate: bool = True, rate: float = 0.02,
                 prior: float = 4.0) -> None:
        self.expert_bytes = int(expert_bytes)
        self.budget_bytes = int(budget_bytes)
        self.in_flight: set[ExpertKey] = set()  # issued, copy not finished
        self.landed: set[ExpertKey] = set()  # copy finished, not used yet, its step still to come
        self.idle: set[ExpertKey] = set()  # copy finished, its layer ran without it: resident, unprotected
        self.outcomes = PrefetchOutcomes()
        self.gate = bool(gate)
        self._rate = float(rate)  # weight of the newest sample in each running average
        self._prior = float(prior)  # pseudo-copies behind the predictor's own score
        self._layers = 1  # MoE layers seen: one token plans once per layer
        self._plans = 0
        self._issued_at: dict[ExpertKey, tuple[int, int, int]] = {}  # key -> (plan index, score decile, phase)
        self._phases = {PREFILL: _Estimates(), DECODE: _Estimates()}
        self._est = self._phases[DECODE]  # the phase of the latest plan
        self._scope_of = None  # cache.scope_of, from the first plan
        self._unused: dict[int, deque[ExpertKey]] = {}  # scope -> issued copies not yet resolved, oldest first
        self._charged: dict[ExpertKey, int] = {}  # unused copy -> misses charged to it
        self._evictions: dict[int, int] = {}  # scope -> evictions so far
        self._ghost: dict[ExpertKey, int] = {}  # evicted key -> its scope's eviction count then
        self._ghost_limit = 4096

    # The latest plan's phase's estimates (what the tests and the docs call rho, g and delta).
    occupancy = property(lambda self: self._est.occupancy)
    gain = property(lambda self: self._est.gain)
    damage = property(lambda self: self._est.damage)

    def expected_value(self, score: float, evicts: bool) -> float:
        """Net stall saved by copying a candidate of ``score`` now, in copies (> 0: worth issuing)."""
        est = self._est
        b = min(int(score * 10.0), 9) if score > 0 else 0
        p = (est.used[b] + self._prior * min(score, 1.0)) / (est.total[b] + self._prior)
        cost = est.occupancy + est.damage if evicts else est.occupancy
        return p * est.gain - (1.0 - p) * cost

    def _sample(self, est: _Estimates, name: str, value: float) -> None:
        n = est.samples[name] = est.samples[name] + 1
        rate = max(self._rate, 1.0 / n)  # a plain mean at first, then a running average
        setattr(est, name, getattr(est, name) + rate * (value - getattr(est, name)))

    def _resolve(self, key: ExpertKey, used: bool, busy: bool | None) -> None:
        """An issued copy's fate is known: feed its phase's calibration and running averages."""
        issued = self._issued_at.pop(key, None)
        if issued is None:
            return
        _plan, b, phase = issued
        est = self._phases[phase]
        self._sample(est, "damage", float(self._charged.pop(key, 0)))
        est.total[b] += 1.0
        if used:
            est.used[b] += 1.0
        if busy is not None:
            self._sample(est, "occupancy", 1.0 if busy else 0.0)

    # -- planning ----------------------------------------------------------------
    def plan(
        self,
        predictions: Iterable[tuple[ExpertKey, float]],
        cache: ExpertCache,
        needed_now: AbstractSet[ExpertKey],
        phase: int = DECODE,
    ) -> list[tuple[ExpertKey, int, ExpertKey | None]]:
        """Choose what to copy now; reserves slots in ``cache``.

        Returns ``(key, slot, evicted)`` for each copy to issue, best first. The
        caller issues the copies and calls :meth:`on_complete` when each lands.
        ``phase`` (prefill or decode) selects the estimates the gate weighs with.
        """
        issued = []
        self._plans += 1
        est = self._est = self._phases[phase]
        self._scope_of = cache.scope_of
        budget_left = self.budget_bytes - len(self.in_flight) * self.expert_bytes
        in_flight_per_scope: dict[int, int] = {}
        for k in self.in_flight:
            scope = cache.scope_of(k.layer)
            in_flight_per_scope[scope] = in_flight_per_scope.get(scope, 0) + 1
        ranked = sorted(predictions, key=lambda p: -p[1])
        # A prefetch evicts an expert the prediction does not name if it can; failing that, one the
        # prediction rates below the expert being placed. Never one rated at least as likely.
        wanted = {k for k, _ in ranked}
        above: set[ExpertKey] = set()  # the candidates ranked up to the current one
        for key, score in ranked:
            above.add(key)
            if budget_left < self.expert_bytes:
                break
            if key in needed_now or cache.is_resident(key):
                continue
            if key.layer >= self._layers:
                self._layers = key.layer + 1
            scope = cache.scope_of(key.layer)
            if in_flight_per_scope.get(scope, 0) + 1 >= cache.capacity(key.layer):
                continue  # a demand miss of that scope must always find an unpinned slot
            if self.gate and self.expected_value(score, not cache.has_free_slot(key.layer)) <= 0:
                est.rejected += 1
                if not _explores(est):
                    continue
            protected = set(needed_now) | self.in_flight | self.landed | wanted
            placed = cache.insert(key, protected)
            if placed is None and len(above) < len(wanted):
                placed = cache.insert(key, set(needed_now) | self.in_flight | self.landed | above)
            if placed is None:
                continue  # every resident expert of that scope is protected
            slot, evicted = placed
            if evicted is not None:
                self.on_evict(evicted)
            self.in_flight.add(key)
            self._issued_at[key] = (self._plans, min(int(score * 10.0), 9) if score > 0 else 0, phase)
            self._unused.setdefault(scope, deque()).append(key)
            self._charged[key] = 0
            self._ghost.pop(key, None)
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
            issued = self._issued_at.get(key)
            if issued is not None:  # landed before the next layer planned: the link had room
                self._sample(self._phases[issued[2]], "occupancy", 1.0 if self._plans > issued[0] else 0.0)

    def on_access(self, key: ExpertKey) -> None:
        """The engine/simulator needs ``key`` now (call before waiting on its copy)."""
        issued = self._issued_at.get(key)
        est = self._phases[issued[2]] if issued is not None else self._est
        if key in self.landed or key in self.idle:
            self.landed.discard(key)
            self.idle.discard(key)
            self.outcomes.useful += 1
            self._resolve(key, True, None)
            self._sample(est, "gain", 1.0)
        elif key in self.in_flight:
            self.in_flight.discard(key)
            self.outcomes.late += 1
            self._resolve(key, True, True)
            self._sample(est, "gain", 0.05)
        seen = self._ghost.pop(key, None)
        if seen is not None:
            self._charge(key, seen)

    def _unused_copies(self, scope: int) -> deque[ExpertKey]:
        """The scope's unused copies, oldest first (resolved ones dropped on the way)."""
        copies = self._unused.get(scope)
        if copies is None:
            return deque()
        while copies and copies[0] not in self._charged:
            copies.popleft()
        return copies

    def _charge(self, key: ExpertKey, evicted_at: int) -> None:
        """``key`` is needed again after it was evicted: a miss the unused copies caused?"""
        scope = self._scope_of(key.layer)
        copies = self._unused_copies(scope)
        unused = sum(1 for k in copies if k in self._charged)
        if unused and self._evictions.get(scope, 0) - evicted_at < unused:  # one of the last `unused` evicted
            self._charged[copies[0]] += 1

    def on_evict(self, key: ExpertKey) -> None:
        # An unused copy leaving is no eviction a cache without copies would have made: it neither enters
        # the ghost list nor pushes the experts evicted before it out of the unused copies' window.
        if self._scope_of is not None and key not in self.landed and key not in self.idle:
            scope = self._scope_of(key.layer)
            n = self._evictions[scope] = self._evictions.get(scope, 0) + 1
            self._ghost[key] = n
            if len(self._ghost) > self._ghost_limit:  # only the last few evictions of a scope can be charged
                cutoff = {s: c - 64 for s, c in self._evictions.items()}
                self._ghost = {k: v for k, v in self._ghost.items() if v > cutoff[self._scope_of(k.layer)]}
                self._ghost_limit = 2 * len(self._ghost) + 4096  # amortised O(1) per eviction
        if key in self.landed or key in self.idle:
            self.landed.discard(key)
            self.idle.discard(key)
            self.outcomes.wasted += 1
            self._resolve(key, False, None)

    def stale(self, layer: int, scope_layers: int | None = None) -> list[ExpertKey]:
        """Prefetches for ``layer`` that the step just routed at ``layer`` did not use.

        Call after :meth:`on_access` for every expert of ``layer``: whatever is
        still tracked for that layer was a wrong guess for this step. Copies still
        in flight are returned so the caller can cancel them (and free their slot);
        landed ones stay resident and may still be used later (or get evicted: wasted),
        but are no longer protected from later prefetches: their step is over.
        """
        done = [k for k in self.landed if k.layer == layer]
        for k in done:
            self.landed.discard(k)
            self.idle.add(k)
        return [k for k in self.in_flight if k.layer == layer]

    def on_cancel(self, key: ExpertKey) -> None:
        if key in self.in_flight:
            self.in_flight.discard(key)
            self.outcomes.wasted += 1
            self.outcomes.cancelled += 1
            self._resolve(key, False, True)
