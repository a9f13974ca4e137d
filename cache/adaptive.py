"""Adaptive eviction: per cache scope, follow whichever simple policy is winning right now.

Design: no single signal wins on every routing. Skewed, stable routing rewards
frequency (LFU); topic changes and drifting hot sets reward recency (LRU) or
decayed frequency; most real traces sit in between (LFRU), and different layers
of one model sit in different places. Tuning one policy on one trace is how the
round-1 default lost on real routing. So this policy learns online, per scope
(a layer, or the whole model for a shared cache), which signal to trust:

- It keeps a *shadow cache* per candidate (LRU; LFU; LFU with a decay of a
  128-tick half-life; LFRU), each the size of the real scope: key sets only, no
  bytes. When a step of the scope is complete, each shadow replays it as the
  cache would for that candidate alone (its hits first, then its misses, in
  waves when the step is wider than the scope, the step's experts protected), so
  a shadow's hits are exactly that candidate's hits. Replaying in the real
  cache's order instead would favour whichever candidate the cache follows.
- Each shadow earns a score on every access where the shadows disagree (some
  hit, some miss), decayed so that the last few hundred disagreements count.
  This is the regret signal of LeCaR and CACHEUS, measured directly rather than
  through ghost lists.
- The real cache follows the leader: its victim is a resident key that the
  leader's shadow does not hold (the leader's own eviction, or an expert that
  landed by prefetch and was never used), least ranked by the leader first. In
  steady state the real cache *is* the leader's shadow and hits exactly as the
  leader would; after a switch it converges to the new leader's contents within
  a few misses. A challenger takes over only when it leads by a margin, so a
  tie does not make the cache churn.

Cost per access: four heap pushes (O(log n)) and a handful of float updates;
victims come from a set that is almost always one key long, else from the
leader's heap. The capacity of a
scope is learned at its first eviction (the number of resident keys then), and
a first eviction that sees keys of several layers switches to one shared scope.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection
from collections.abc import Set as AbstractSet

from cache._clock import LayerClock
from cache.base import ExpertKey, lowest_ranked, register_policy

CANDIDATES = ("lru", "lfu", "lfu-decay", "lfru")


class _Shadow:
    """A key set of bounded size, evicting its lowest rank; ranks only grow on access (lazy heap)."""

    __slots__ = ("heap", "members")

    def __init__(self) -> None:
        self.members: dict[ExpertKey, tuple] = {}  # key -> current rank
        self.heap: list[tuple] = []  # (rank, key); stale entries skipped on pop

    def touch(self, key: ExpertKey, rank: tuple) -> None:
        self.members[key] = rank
        heapq.heappush(self.heap, (rank, key))
        if len(self.heap) > 4 * len(self.members) + 64:
            self.heap = [(r, k) for k, r in self.members.items()]
            heapq.heapify(self.heap)

    def peek(self, ok) -> ExpertKey | None:
        """The lowest-ranked member for which ``ok(key)`` holds, left in place (None if no member)."""
        heap, members = self.heap, self.members
        popped = []
        found = None
        while heap:
            entry = heapq.heappop(heap)
            if members.get(entry[1]) != entry[0]:
                continue  # stale: dropped for good
            popped.append(entry)
            if ok(entry[1]):
                found = entry[1]
                break
        for entry in popped:
            heapq.heappush(heap, entry)
        return found

    def pop_victim(self, protected: AbstractSet[ExpertKey]) -> ExpertKey:
        """Remove and return the lowest-ranked unprotected member (the lowest protected one if all are)."""
        heap, members = self.heap, self.members
        skipped = []
        victim = None
        while heap:
            entry = heapq.heappop(heap)
            rank, key = entry
            if members.get(key) != rank:
                continue  # stale
            if key in protected:
                skipped.append(entry)
                continue
            victim = key
            break
        if victim is None:  # the step needs more experts than the scope holds: evict one of them
            victim = skipped.pop(0)[1]
        for entry in skipped:
            heapq.heappush(heap, entry)
        del members[victim]
        return victim


class _Scope:
    __slots__ = ("capacity", "leader", "now", "outside", "pending", "real", "score", "shadows", "step")

    def __init__(self, leader: int) -> None:
        self.capacity: int | None = None  # learned at the first eviction
        self.shadows = [_Shadow() for _ in CANDIDATES]
        self.score = [0.0] * len(CANDIDATES)
        self.leader = leader
        self.real: set[ExpertKey] = set()  # keys resident in the real cache
        self.outside: set[ExpertKey] = set()  # real keys the leader's shadow does not hold
        self.step = -1
        self.pending: list[tuple[ExpertKey, tuple]] = []  # the step in progress: (key, its ranks)
        self.now: set[ExpertKey] = set()  # the keys of ``pending``

    def follow(self, leader: int) -> None:
        self.leader = leader
        members = self.shadows[leader].members
        self.outside = {k for k in self.real if k not in members}


@register_policy("adaptive")
class AdaptivePolicy:
    def __init__(self, half_life: float = 128.0, window: float = 400.0, margin: float = 2.0,
                 lfru_weight: float = 2.0, lfru_max_count: int = 8, start: str = "lfru") -> None:
        if half_life <= 0 or window <= 1 or margin < 0:
            raise ValueError("adaptive: half_life > 0, window > 1 and margin >= 0 are required")
        if start not in CANDIDATES:
            raise ValueError(f"adaptive: start must be one of {', '.join(CANDIDATES)}, got {start!r}")
        self._log_growth = math.log(2.0) / float(half_life)  # log-domain decayed counts, no overflow
        self._keep = 1.0 - 1.0 / float(window)
        self.margin = float(margin)
        self.lfru_weight = float(lfru_weight)
        self.lfru_max_count = int(lfru_max_count)
        self._start = CANDIDATES.index(start)
        self._clock = LayerClock()
        self._count: dict[ExpertKey, int] = {}
        self._log_decayed: dict[ExpertKey, float] = {}
        self._seq = 0
        self._last: dict[ExpertKey, int] = {}  # seq of the last access (orders keys outside the leader)
        self._scopes: dict[int, _Scope] = {}
        self._shared: _Scope | None = None  # set once a first eviction shows one scope spans layers
        self.switches = 0  # leader changes, all scopes (a diagnostic)

    # -- scopes -------------------------------------------------------------------------
    def _scope(self, key: ExpertKey) -> _Scope:
        if self._shared is not None:
            return self._shared
        scope = self._scopes.get(key.layer)
        if scope is None:
            scope = self._scopes[key.layer] = _Scope(self._start)
        return scope

    def leaders(self) -> dict[int, str]:
        """The candidate each scope follows now (scope -1: one shared cache)."""
        if self._shared is not None:
            return {-1: CANDIDATES[self._shared.leader]}
        return {layer: CANDIDATES[s.leader] for layer, s in sorted(self._scopes.items())}

    def _share_scopes(self) -> _Scope:
        """Merge the per-layer scopes into one (exact: nothing was evicted before the first eviction)."""
        shared = _Scope(self._start)
        for scope in self._scopes.values():
            if scope.step > shared.step:  # the step in progress is replayed when it completes
                shared.step, shared.pending, shared.now = scope.step, list(scope.pending), set(scope.now)
            shared.real |= scope.real
            for mine, theirs in zip(shared.shadows, scope.shadows):
                mine.members.update(theirs.members)
        for shadow in shared.shadows:
            shadow.heap = [(r, k) for k, r in shadow.members.items()]
            heapq.heapify(shadow.heap)
        shared.follow(shared.leader)
        self._shared = shared
        self._scopes = {}
        return shared

    # -- the candidates' ranks (lowest is evicted first) ------------------------------------
    def _ranks(self, key: ExpertKey, tick: int) -> tuple[tuple, ...]:
        self._seq += 1
        seq = self._seq
        self._last[key] = seq
        count = self._count.get(key, 0) + 1
        self._count[key] = count
        now = tick * self._log_growth  # a use at tick t weighs 2^(t / half_life)
        old = self._log_decayed.get(key)
        if old is None:
            decayed = now
        else:
            hi, lo = (old, now) if old > now else (now, old)
            decayed = hi + math.log1p(math.exp(lo - hi))
        self._log_decayed[key] = decayed
        lfru = tick + self.lfru_weight * min(count, self.lfru_max_count)
        return (seq,), (count, seq), (decayed, seq), (lfru, seq)

    # -- the policy interface ---------------------------------------------------------------
    def on_access(self, key: ExpertKey, hit: bool, step: int) -> None:
        ranks = self._ranks(key, self._clock.advance(key.layer, step))
        scope = self._scope(key)
        if scope.step != step:
            self._replay(scope)
            scope.step = step
        scope.pending.append((key, ranks))
        scope.now.add(key)

    def _replay(self, scope: _Scope) -> None:
        """The completed step, through every shadow as the cache would run it; then score and follow."""
        pending = scope.pending
        if not pending:
            return
        scope.pending = []
        scope.now = set()
        cap = scope.capacity
        leader = scope.leader
        n = len(CANDIDATES)
        got = [[False] * n for _ in pending]
        touched = set()
        for i, shadow in enumerate(scope.shadows):
            members = shadow.members
            order = []
            for j, (key, _) in enumerate(pending):
                if key in members:
                    got[j][i] = True
                    order.append(j)
            order += [j for j in range(len(pending)) if not got[j][i]]  # hits first, as the cache does
            width = len(order) if cap is None else cap
            for start in range(0, len(order), width):
                wave = order[start:start + width]
                protected = {pending[j][0] for j in wave}
                for j in wave:
                    key, ranks = pending[j]
                    shadow.touch(key, ranks[i])
                    if cap is not None and len(members) > cap:
                        gone = shadow.pop_victim(protected)
                        if i == leader:
                            touched.add(gone)
        members = scope.shadows[leader].members
        real, outside = scope.real, scope.outside
        for key in touched.union(k for k, _ in pending):
            if key in real and key not in members:
                outside.add(key)
            else:
                outside.discard(key)
        keep = self._keep
        score = scope.score
        for row in got:
            hits = sum(row)
            if 0 < hits < n:  # the candidates disagree: that is what tells them apart
                for i in range(n):
                    score[i] = score[i] * keep + (1.0 if row[i] else 0.0)
        best = max(range(n), key=score.__getitem__)
        if best != leader and score[best] > score[leader] + self.margin:
            scope.follow(best)
            self.switches += 1

    def on_insert(self, key: ExpertKey) -> None:
        scope = self._scope(key)
        scope.real.add(key)
        if key not in scope.now and key not in scope.shadows[scope.leader].members:
            scope.outside.add(key)  # a prefetched expert not used yet: first to go if it stays unused

    def on_evict(self, key: ExpertKey) -> None:
        scope = self._scope(key)
        scope.real.discard(key)
        scope.outside.discard(key)

    def victim(self, resident: Collection[ExpertKey], protected: AbstractSet[ExpertKey]) -> ExpertKey:
        resident_set = resident if isinstance(resident, (AbstractSet, dict)) else set(resident)
        if not resident_set:
            raise RuntimeError("no evictable expert: the scope is empty")
        scope = self._shared
        if scope is None:
            scope = self._scope(next(iter(resident_set)))
            if len(resident_set) != len(scope.real):  # O(1): keys of other layers share this scope
                scope = self._share_scopes()
        if scope.capacity is None:
            self._learn_capacity(scope, len(resident_set))
        last = self._last
        best, best_rank = None, None
        for key in scope.outside:  # least recent first; a prefetched expert never used goes before all
            if key in protected or key not in resident_set:
                continue
            rank = last.get(key, 0)
            if best_rank is None or rank < best_rank:
                best, best_rank = key, rank
        if best is not None:
            return best
        # Nothing outside the leader: its lowest-ranked resident key, as its shadow would evict; this
        # step's keys (a wave of a step wider than the scope) rank as they will once the step is replayed.
        lead = scope.leader
        shadow = scope.shadows[lead]
        fresh = {}
        for key, ranks in scope.pending:
            fresh[key] = ranks[lead]
        key = shadow.peek(lambda k: k in resident_set and k not in protected and k not in fresh)
        best, best_rank = key, (shadow.members[key] if key is not None else None)
        for key, rank in fresh.items():
            if key in resident_set and key not in protected and (best_rank is None or rank < best_rank):
                best, best_rank = key, rank
        if best is not None:
            return best
        members = shadow.members  # resident keys the leader never held (none in practice) go first
        return lowest_ranked(resident_set, protected, lambda k: members.get(k, ()))

    def _learn_capacity(self, scope: _Scope, capacity: int) -> None:
        scope.capacity = capacity
        for i, shadow in enumerate(scope.shadows):
            while len(shadow.members) > capacity:
                gone = shadow.pop_victim(frozenset())
                if i == scope.leader and gone in scope.real:
                    scope.outside.add(gone)
