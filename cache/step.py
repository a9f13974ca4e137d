"""One MoE layer's step: the protocol the live engine and the offline simulator both run.

    land finished prefetches -> count accesses -> (host misses) -> cache.access in waves
    per wave: demand copies -> (first wave: cancel stale prefetches, plan new ones)
              -> wait (stall) -> yield the wave to the caller, who computes -> fence
    host-computed misses, if any, last

Design: the engine and the simulator differ only in what a copy is (a DMA on a
stream, a memcpy on a worker thread, a page that is already readable, or a point
on a modelled clock) and in what a compute is (kernels, or nothing). Both sit
behind small objects chosen at construction: a :class:`Link` moves pages into
slots, a :class:`Prefetching` (or :class:`NoPrefetching`) owns the predictor,
the planner and the copies in flight, a host chooser (or :data:`NO_HOST`) picks
misses computed where the expert lives. Everything that decides a count lives
here once, so a policy or predictor tuned offline counts the same live.

No tensors here: routing arrives as a host ``[T, K]`` array-like and the
unique experts with their token counts, already computed by the caller.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cache.base import ExpertKey
from cache.manager import ExpertCache, StepResult

PREFILL, DECODE = 0, 1


class Link(Protocol):
    """Moves expert pages into cache slots (live: a transfer engine; offline: a modelled clock)."""

    def demand(self, key: ExpertKey, slot: int) -> Any: ...  # a copy the current step waits for
    def prefetch(self, key: ExpertKey, slot: int) -> Any: ...  # a copy for a later layer, lower priority
    def landed(self, handle: Any) -> bool: ...  # finished, without blocking
    def cancel(self, handle: Any) -> bool: ...  # False when the copy already started
    def promote(self, handle: Any) -> None: ...  # a queued prefetch is needed now
    def wait(self, handles: Sequence[Any], clock: StallClock, phase: int) -> None: ...  # next compute sees them
    def fence(self) -> None: ...  # copies issued from now on may overwrite what the last compute read
    def drain(self, handles: Sequence[Any]) -> None: ...  # block until done (outside the hot path)


class StallClock:
    """Seconds the compute waited for copies, per phase.

    Host-timed links add seconds at once; device-timed links add a measurement
    that becomes readable later (e.g. a pair of CUDA events) and is settled
    without blocking on the next step, or blocking in :meth:`settle`.
    """

    def __init__(self, seconds: list[float] | None = None) -> None:
        self.seconds = seconds if seconds is not None else [0.0, 0.0]  # [phase], shared with the counters
        self._pending: list[tuple[int, Any]] = []  # (phase, measurement with ready() and seconds())

    def add(self, phase: int, seconds: float) -> None:
        self.seconds[phase] += seconds

    def defer(self, phase: int, measurement: Any) -> None:
        self._pending.append((phase, measurement))

    def settle(self, block: bool = False) -> list[float]:
        pending = self._pending
        if pending:
            keep = []
            for phase, m in pending:
                if block or m.ready():
                    self.seconds[phase] += m.seconds()
                else:
                    keep.append((phase, m))
            self._pending = keep
        return self.seconds


@dataclass
class StepCounters:
    """Cumulative counters, exported as metrics (live) or as results (simulator)."""

    num_layers: int
    queries: list[list[int]] = field(default_factory=list)  # [phase][layer]
    hits: list[list[int]] = field(default_factory=list)  # [phase][layer]
    activations: list[list[int]] = field(default_factory=list)  # [layer][expert] routed (token, expert) pairs
    demand_bytes: int = 0
    prefetch_bytes: int = 0
    demand_copies: int = 0
    prefetch_copies: int = 0
    stall_seconds: list[float] = field(default_factory=lambda: [0.0, 0.0])  # [phase]
    prefetch_issued: int = 0
    prefetch_useful: int = 0
    prefetch_wasted: int = 0
    prefetch_late: int = 0
    prefetch_cancelled: int = 0
    cpu_computed: int = 0
    routing_substitutions: int = 0
    capacity_bytes: int = 0
    used_bytes: int = 0
    forward_steps: int = 0
    page_bytes_saved: int = 0  # per page: float page in the compute dtype minus the (quantized) page

    def bytes_saved(self) -> dict[str, int]:
        """Bytes quantized pages saved: over the link (demand, prefetch) and read by expert compute."""
        reads = sum(map(sum, self.queries))  # every queried expert's page is read once per step
        per = self.page_bytes_saved
        return {"demand": self.demand_copies * per, "prefetch": self.prefetch_copies * per, "compute": reads * per}

    @classmethod
    def create(cls, num_layers: int, num_experts: int) -> StepCounters:
        return cls(
            num_layers=num_layers,
            queries=[[0] * num_layers, [0] * num_layers],
            hits=[[0] * num_layers, [0] * num_layers],
            activations=[[0] * num_experts for _ in range(num_layers)],
        )


@dataclass
class Wave:
    """Experts computed together: each with the slot holding its page (None: computed from the host page)."""

    layer: int
    experts: list[int]
    slots: list[int | None]
    on_host: bool = False

    @classmethod
    def of(cls, layer: int, result: StepResult) -> Wave:
        experts = [k.expert for k, _ in result.hits] + [k.expert for k, _, _ in result.misses]
        slots = [s for _, s in result.hits] + [s for _, s, _ in result.misses]
        return cls(layer, experts, slots)


# -- prefetching: predictor + planner + the copies in flight ---------------------------------------
class NoPrefetching:
    """Demand paging only: every hook is free."""

    def __init__(self) -> None:
        self.inflight: dict = {}  # always empty

    def land(self) -> None:
        return None

    def accessed(self, keys: list[ExpertKey]) -> None:
        return None

    def late(self, key: ExpertKey) -> Any:
        return None

    def on_evict(self, key: ExpertKey) -> None:
        return None

    def issue(self, layer: int, hidden: Any, routing: Any, needed: list[ExpertKey], phase: int = DECODE) -> None:
        return None

    def reset(self) -> None:
        return None

    wants_tokens = False

    def observe_tokens(self, tokens: Any) -> None:
        return None

    def begin_request(self) -> None:
        return None

    def drain(self) -> None:
        return None

    def sync_counters(self, counters: StepCounters) -> None:
        return None


class Prefetching:
    """The predictor guesses, the planner chooses and reserves slots, the link copies."""

    def __init__(self, predictor: Any, planner: Any, cache: ExpertCache, link: Link, counters: StepCounters,
                 page_bytes: int) -> None:
        self.predictor = predictor
        self.planner = planner
        self.cache = cache
        self.link = link
        self.counters = counters
        self.page_bytes = page_bytes
        self.inflight: dict[ExpertKey, Any] = {}  # prefetch copies not known to have landed

    def land(self) -> None:
        landed, planner = self.link.landed, self.planner
        done = [key for key, handle in self.inflight.items() if landed(handle)]
        for key in done:
            planner.on_complete(key)
            del self.inflight[key]

    def accessed(self, keys: list[ExpertKey]) -> None:
        on_access = self.planner.on_access
        for key in keys:
            on_access(key)

    def late(self, key: ExpertKey) -> Any:
        """The copy of ``key`` if it is still in flight (the step promotes and waits on it)."""
        handle = self.inflight.pop(key, None)
        if handle is None or self.link.landed(handle):
            return None
        self.link.promote(handle)
        return handle

    def on_evict(self, key: ExpertKey) -> None:
        self.planner.on_evict(key)

    def issue(self, layer: int, hidden: Any, routing: Any, needed: list[ExpertKey], phase: int = DECODE) -> None:
        planner, link, inflight = self.planner, self.link, self.inflight
        # Stale copies first: a cancelled prefetch frees its slot and budget for this plan.
        for key in planner.stale(layer):
            handle = inflight.get(key)
            if handle is not None and link.cancel(handle):
                del inflight[key]
                self.cache.evict(key)
                planner.on_cancel(key)
        self.predictor.observe(layer, hidden, routing)
        for key, slot, _evicted in planner.plan(self.predictor.predict(layer), self.cache, set(needed), phase):
            inflight[key] = link.prefetch(key, slot)
            self.counters.prefetch_copies += 1
            self.counters.prefetch_bytes += self.page_bytes
        self.sync_counters(self.counters)

    def reset(self) -> None:
        self.predictor.reset()

    @property
    def wants_tokens(self) -> bool:
        """Whether the predictor reads the steps' input token ids (``observe_tokens``)."""
        return hasattr(self.predictor, "observe_tokens") and bool(getattr(self.predictor, "wants_tokens", True))

    def observe_tokens(self, tokens: Any) -> None:
        """The step's input token ids [T] (one per routed row), for predictors that read them."""
        hook = getattr(self.predictor, "observe_tokens", None)
        if hook is not None:
            hook(tokens)

    def begin_request(self) -> None:
        hook = getattr(self.predictor, "begin_request", None)
        if hook is not None:
            hook()

    def drain(self) -> None:
        self.link.drain(list(self.inflight.values()))
        for key in self.inflight:
            self.planner.on_complete(key)
        self.inflight.clear()

    def sync_counters(self, counters: StepCounters) -> None:
        out = self.planner.outcomes
        counters.prefetch_issued, counters.prefetch_useful = out.issued, out.useful
        counters.prefetch_wasted, counters.prefetch_late = out.wasted, out.late
        counters.prefetch_cancelled = out.cancelled


class InstantLink:
    """A page is readable where it already is (CPU zero copy) or copies take no time (simulator)."""

    LANDED = object()

    def demand(self, key: ExpertKey, slot: int) -> Any:
        return self.LANDED

    def prefetch(self, key: ExpertKey, slot: int) -> Any:
        return self.LANDED

    def landed(self, handle: Any) -> bool:
        return True

    def cancel(self, handle: Any) -> bool:
        return False

    def promote(self, handle: Any) -> None:
        return None

    def wait(self, handles: Sequence[Any], clock: StallClock, phase: int) -> None:
        return None

    def fence(self) -> None:
        return None

    def drain(self, handles: Sequence[Any]) -> None:
        return None

    def close(self) -> None:
        return None


class NoHostCompute:
    """Every miss is fetched."""

    def choose(self, layer: int, experts: list[int], counts: list[int], cache: ExpertCache,
               inflight: dict) -> list[int]:
        return []


NO_HOST = NoHostCompute()


# -- the step -------------------------------------------------------------------------------------
class LayerStep:
    def __init__(self, cache: ExpertCache, link: Link, counters: StepCounters, page_bytes: int,
                 prefetching: Prefetching | NoPrefetching | None = None, host: Any = NO_HOST) -> None:
        self.cache = cache
        self.link = link
        self.counters = counters
        self.page_bytes = page_bytes
        self.prefetching = prefetching if prefetching is not None else NoPrefetching()
        self.host = host
        self.stall = StallClock(counters.stall_seconds)
        self.clock = 0  # one tick per (forward, layer) access: the policy's step

    def run(self, layer: int, experts: list[int], counts: list[int], phase: int, hidden: Any,
            routing: Any) -> Iterator[Wave]:
        """Make ``experts`` (unique, with token ``counts``) usable, yielding one :class:`Wave` at a time.

        The caller computes each wave before asking for the next: the fence that
        follows lets the next wave's copies overwrite slots the wave just read.
        """
        cache, link, counters, pf = self.cache, self.link, self.counters, self.prefetching
        step = self.clock
        self.clock += 1
        if layer == 0:
            self.stall.settle()  # device-timed stalls that are readable by now (never blocks)
        act = counters.activations[layer]
        for e, n in zip(experts, counts):
            act[e] += n
        keys = cache.keys_of(layer, experts)
        pf.land()
        pf.accessed(keys)
        on_host = self.host.choose(layer, experts, counts, cache, pf.inflight)
        if on_host:
            cache.bypass(layer, on_host, step)
            counters.queries[phase][layer] += len(on_host)
            counters.cpu_computed += len(on_host)
            skip = set(on_host)
            experts = [e for e in experts if e not in skip]
        waves = cache.access(layer, experts, step, pinned=pf.inflight.keys()) if experts else []
        planned = False
        for result in waves:
            handles = []
            for key, slot, evicted in result.misses:
                if evicted is not None:
                    pf.on_evict(evicted)
                handles.append(link.demand(key, slot))
            counters.demand_copies += len(result.misses)
            counters.demand_bytes += len(result.misses) * self.page_bytes
            if not planned:
                # Plan once the first demand copies are queued: later layers' copies then overlap this
                # layer's wait and compute instead of starting a layer late.
                pf.issue(layer, hidden, routing, keys, phase)
                planned = True
            for key, _slot in result.hits:
                handle = pf.late(key)
                if handle is not None:
                    handles.append(handle)
            counters.queries[phase][layer] += len(result.hits) + len(result.misses)
            counters.hits[phase][layer] += len(result.hits)
            if handles:
                link.wait(handles, self.stall, phase)
            yield Wave.of(layer, result)
            link.fence()
        if not planned:  # every miss computed on the host, or nothing routed
            pf.issue(layer, hidden, routing, keys, phase)
        if on_host:
            yield Wave(layer, on_host, [None] * len(on_host), on_host=True)
        counters.used_bytes = cache.used_slots() * self.page_bytes

    def sync_counters(self, block: bool = False) -> StepCounters:
        """Bring the counters that are kept elsewhere (stall, prefetch outcomes) up to date."""
        self.stall.settle(block)
        self.prefetching.sync_counters(self.counters)
        return self.counters

    def drain(self) -> None:
        """Wait for every copy in flight (before swapping policies, at shutdown)."""
        self.prefetching.drain()
        self.sync_counters(block=True)
