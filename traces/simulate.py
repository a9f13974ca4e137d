"""The offline simulator: replay a trace through the engine's own cache, policy and planner.

Design: ``ExpertCache``, the policy objects, ``PrefetchPlanner``, the hybrid
cost model (``cache.hybrid``) and cache-aware routing (``cache.routing``) are
the very ones the engine runs, so a hit rate measured here is the hit rate the
engine gets on the same routing. The simulator adds only what the engine gets
from hardware: a step order (rows grouped by the trace's ``step`` field, as the
engine batched them, or one row per step) and, optionally, a clock: a
:class:`~traces.link.TimedLink` for the host link, a fixed compute time per
wave, and the host's expert time (a page read plus a time per token), from
which stall per token and tokens/s follow. With any lever beyond the policy,
each layer runs through ``cache.step.LayerStep``, the very protocol the engine runs.

Hybrid execution (``cpu_compute``): misses the cost model keeps on the host are
computed after the layer's device waves, on the same clock (serialized, as on a
CPU-only machine; on a GPU machine the two overlap, so the model is an upper
bound on their time). A layer whose every expert ran on the host still pays one
``layer_compute_us`` (its dense part).

Cache-aware routing needs the router's scores, which a trace holds only when
the engine recorded it with ``--cache-aware-routing`` (or ``traces.synth`` made
them); the replay substitutes from the router's recorded choice and the cache
as it is at that step. Later tokens keep their recorded routing: the model's
reaction to a substitution is not simulated (a first-order model).

Step numbering is the engine's: one cache step per (forward, layer) access. The
unique experts of every (step, layer) are precomputed with numpy, so the inner
loop is plain Python over int lists.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cache.base import ExpertKey, is_offline_only
from cache.capacity import split_capacity
from cache.hybrid import MODES, HybridCostModel
from cache.manager import ExpertCache
from cache.routing import cache_aware_route
from cache.shape import ModelShape, build_policy_for
from cache.step import DECODE, NO_HOST, InstantLink, LayerStep, NoPrefetching, Prefetching, StepCounters
from prefetch.base import build_predictor
from prefetch.planner import PrefetchPlanner
from traces.format import Trace, load_trace
from traces.link import TimedLink
from traces.stats import working_set_profile


@dataclass(frozen=True)
class SimConfig:
    policy: str = "lru"
    capacities: tuple[int, ...] = ()  # one per layer (scope layer) or one (scope global)
    scope: str = "layer"
    prefetch: str = "none"
    prefetch_lookahead: int = 1
    predictor_path: str | None = None
    prefetch_budget_bytes: int | None = None  # None: top_k experts per predicted layer, as live
    prefetch_gate: bool = True  # the planner's value gate
    expert_bytes: int | None = None
    link_gbps: float | None = None  # GB/s (1e9 bytes per second)
    link_latency_us: float = 0.0
    layer_compute_us: float = 0.0
    per_token: bool = False
    cpu_compute: str = "never"  # never | auto | always: as the engine's --cpu-compute
    host_read_gbps: float | None = None  # host read bandwidth: one expert's page read per host-computed miss
    host_token_us: float = 0.0  # host compute per token of a host-computed expert
    cache_aware_routing: float | None = None  # delta; None: off (0 runs the routing path, changes nothing)
    policy_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SimResult:
    policy: str
    hits: int
    accesses: int
    experts_moved: int
    bytes_moved: int | None
    tokens: int
    steps: int
    per_layer_hit_rate: list[float]
    prefetch: dict[str, int]
    stall_seconds: float | None = None
    total_seconds: float | None = None
    host_computed: int = 0
    routing_substitutions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def host_share(self) -> float:
        """The share of misses computed on the host instead of fetched."""
        misses = self.accesses - self.hits
        return self.host_computed / misses if misses else 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": self.policy, "hit_rate": self.hit_rate, "hits": self.hits, "accesses": self.accesses,
            "bytes_moved": self.bytes_moved, "experts_moved": self.experts_moved, "tokens": self.tokens,
            "steps": self.steps, "per_layer_hit_rate": self.per_layer_hit_rate, "prefetch": self.prefetch,
            "host_computed": self.host_computed, "host_share": self.host_share,
            "routing_substitutions": self.routing_substitutions,
        }
        if self.stall_seconds is not None:
            out["stall_seconds_per_token"] = self.stall_seconds / max(self.tokens, 1)
            out["seconds_per_token"] = self.total_seconds / max(self.tokens, 1)
            out["tokens_per_second"] = self.tokens / self.total_seconds if self.total_seconds else float("inf")
        return out


# -- preparing the replay ------------------------------------------------------------------
@dataclass
class Schedule:
    """The trace cut into steps: rows per step, unique sorted experts per (step, layer) with their token
    counts (None for a one-row step: one token each), request starts."""

    rows: list[np.ndarray]
    experts: list[list[list[int]]]
    request_starts: list[list[int]]
    counts: list[list[list[int]] | None]


def build_schedule(trace: Trace, per_token: bool = False) -> Schedule:
    experts = trace.experts
    n = trace.num_rows
    if per_token or trace.step is None or n == 0:
        bounds = np.arange(n + 1)
    else:
        bounds = np.concatenate(([0], np.flatnonzero(np.diff(trace.step)) + 1, [n]))
    if len(bounds) - 1 == n:  # one row per step: sort each row, dedupe only if needed
        srt = np.sort(experts, axis=2)
        if n and (np.diff(srt, axis=2) == 0).any():
            steps = [[sorted(set(r)) for r in row] for row in srt.tolist()]
        else:
            steps = srt.tolist()
        rows = [np.array([i]) for i in range(n)]
        counts: list[list[list[int]] | None] = [None] * n
    else:
        steps, rows, counts = [], [], []
        for a, b in itertools.pairwise(bounds):
            block = experts[a:b]  # [T, L, K]
            uniq = [np.unique(block[:, layer], return_counts=True) for layer in range(trace.num_layers)]
            steps.append([u.tolist() for u, _ in uniq])
            counts.append([c.tolist() for _, c in uniq])
            rows.append(np.arange(a, b))
    # Requests begin in the step holding their first row.
    starts: list[list[int]] = [[] for _ in steps]
    if n:
        _, first = np.unique(trace.request, return_index=True)
        step_of_row = np.repeat(np.arange(len(steps)), np.diff(bounds))
        for row in sorted(first.tolist()):
            starts[int(step_of_row[row])].append(int(trace.request[row]))
    return Schedule(rows=rows, experts=steps, request_starts=starts, counts=counts)


def future_accesses(schedule: Schedule) -> list[tuple[int, ExpertKey]]:
    """The ``(step, key)`` sequence the cache will see: what ``belady`` needs as ``future=``."""
    out = []
    step = 0
    for layers in schedule.experts:
        for layer, experts in enumerate(layers):
            out.extend((step, ExpertKey(layer, e)) for e in experts)
            step += 1
    return out


def make_policy(name: str, schedule: Schedule, num_layers: int, num_experts: int, **kwargs):
    """The policy ``name`` for this trace's shape; offline-only policies get the schedule's future."""
    shape = ModelShape(num_layers, num_experts, top_k=1)
    future = future_accesses(schedule) if is_offline_only(name) else None
    return build_policy_for(name, shape, future=future, **kwargs)


def capacities_for(trace: Trace, *, slots_per_layer: int | None = None, capacity_fraction: float | None = None,
                   split: str = "uniform", scope: str = "layer") -> tuple[list[int], str]:
    """Capacities and scope from the CLI's budget flags; ``split`` may be ``profile:TRACE``."""
    layers, num_experts = trace.num_layers, trace.num_experts
    if (slots_per_layer is None) == (capacity_fraction is None):
        raise ValueError("give exactly one of --slots-per-layer or --capacity-fraction")
    if slots_per_layer is not None:
        per_layer = int(slots_per_layer)
    else:
        if not 0 < capacity_fraction <= 1:
            raise ValueError(f"--capacity-fraction must be in (0, 1], got {capacity_fraction}")
        per_layer = max(1, round(capacity_fraction * num_experts))
    if per_layer < 1:
        raise ValueError("the cache needs at least one slot per layer")
    per_layer = min(per_layer, num_experts)
    total = per_layer * layers
    if split == "global" or scope == "global":
        if split.startswith("profile"):
            raise ValueError("a profile split needs --cache-scope layer")
        return split_capacity(total, layers, "global", num_experts=num_experts), "global"
    if split.startswith("profile:"):
        profile_trace = load_trace(split.split(":", 1)[1], hidden=False)
        if profile_trace.num_layers != layers:
            raise ValueError(f"profile trace has {profile_trace.num_layers} MoE layers, this trace {layers}")
        profile = working_set_profile(profile_trace)
        floor = min(trace.top_k, per_layer)  # never below what one token needs, when the budget allows
        return split_capacity(total, layers, "profile", num_experts=num_experts, profile=profile,
                              min_per_layer=floor), "layer"
    if split != "uniform":
        raise ValueError(f"unknown --cache-split {split!r}; use uniform, global or profile:TRACE")
    return split_capacity(total, layers, "uniform", num_experts=num_experts), "layer"


def warm_if_everything_fits(cache: ExpertCache, num_layers: int, num_experts: int) -> bool:
    """A cache that holds every expert starts full, as the live engine does (no cold misses)."""
    if cache.num_slots < num_layers * num_experts:
        return False
    for layer in range(num_layers):
        for expert in range(num_experts):
            cache.insert(ExpertKey(layer, expert), frozenset())
    return True


# -- the replay ------------------------------------------------------------------------------
def simulate(trace: Trace, config: SimConfig, schedule: Schedule | None = None) -> SimResult:
    """Replay ``trace`` under ``config``; pass a prebuilt ``schedule`` to replay many configs fast."""
    check_levers(trace, config)
    if schedule is None:
        schedule = build_schedule(trace, config.per_token)
    layers = trace.num_layers
    capacities = list(config.capacities) or [trace.num_experts] * layers
    policy = make_policy(config.policy, schedule, layers, trace.num_experts, **config.policy_kwargs)
    cache = ExpertCache(policy, layers, capacities, config.scope)
    warm_if_everything_fits(cache, layers, trace.num_experts)
    timed = config.link_gbps is not None
    if (not timed and config.prefetch == "none" and config.cpu_compute == "never"
            and config.cache_aware_routing is None):
        _replay_plain(cache, schedule)
        return _result(config, trace, schedule, cache, moved=sum(cache.queries) - sum(cache.hits), prefetch={})
    return _replay_full(trace, config, schedule, cache, timed)


def check_levers(trace: Trace, config: SimConfig) -> None:
    """One clear line for a lever the trace or the configuration cannot model."""
    if config.link_gbps is not None and not config.expert_bytes:
        raise ValueError("a link model needs the expert size: give --expert-bytes")
    if config.cpu_compute not in MODES:
        raise ValueError(f"--cpu-compute must be one of {', '.join(MODES)}, got {config.cpu_compute!r}")
    if config.cpu_compute != "never" and (config.link_gbps is not None or config.cpu_compute == "auto"):
        if config.link_gbps is None:
            raise ValueError("--cpu-compute auto compares a copy with host compute: give --link-gbps and "
                             "--expert-bytes")
        if config.host_read_gbps is None and config.host_token_us <= 0:
            raise ValueError("--cpu-compute needs the host's expert time: give --host-read-gbps and/or "
                             "--host-token-us")
    if config.host_read_gbps is not None and config.host_read_gbps <= 0:
        raise ValueError(f"--host-read-gbps must be positive, got {config.host_read_gbps}")
    delta = config.cache_aware_routing
    if delta is not None:
        if delta < 0:
            raise ValueError(f"--cache-aware-routing must be >= 0, got {delta}")
        if delta > 0 and trace.scores is None:
            raise ValueError("--cache-aware-routing needs router scores, which this trace lacks: record it with "
                             "the engine's --record-trace and --cache-aware-routing (0 keeps outputs unchanged), "
                             "or synthesize it with scores")


def hybrid_model(config: SimConfig) -> HybridCostModel:
    """The engine's decision rule with this configuration's copy and host times."""
    fetch = config.link_latency_us * 1e-6 + config.expert_bytes / (config.link_gbps * 1e9) \
        if config.link_gbps is not None else 0.0
    read = config.expert_bytes / (config.host_read_gbps * 1e9) if config.host_read_gbps is not None else 0.0
    return HybridCostModel(config.cpu_compute, fetch, read, config.host_token_us * 1e-6)


def _replay_plain(cache: ExpertCache, schedule: Schedule) -> None:
    access = cache.access
    start = cache.start_request
    step = 0
    for layers, starts in zip(schedule.experts, schedule.request_starts):
        for request in starts:
            start(request)
        for layer, experts in enumerate(layers):
            access(layer, experts, step)
            step += 1


def _replay_full(trace: Trace, config: SimConfig, schedule: Schedule, cache: ExpertCache,
                 timed: bool) -> SimResult:
    """The replay through ``cache.step.LayerStep``: the engine's own per-layer protocol."""
    layers = trace.num_layers
    expert_bytes = int(config.expert_bytes or 1)
    shape = ModelShape(layers, trace.num_experts, trace.top_k, expert_bytes)
    budget = config.prefetch_budget_bytes
    if budget is None:
        budget = trace.top_k * config.prefetch_lookahead * expert_bytes  # the engine's default too
    counters = StepCounters.create(layers, trace.num_experts)
    link = timed_link(config) if timed else InstantLink()
    prefetch = NoPrefetching()
    if config.prefetch != "none":
        predictor = build_predictor(config.prefetch, **shape.predictor_kwargs(config.prefetch_lookahead),
                                    routers=None, path=config.predictor_path,
                                    trace=(trace.experts, [r.tolist() for r in schedule.rows]))
        planner = PrefetchPlanner(expert_bytes, int(budget), gate=config.prefetch_gate)
        prefetch = Prefetching(predictor, planner, cache, link, counters, expert_bytes)
    hybrid = hybrid_model(config) if config.cpu_compute != "never" else None
    step = LayerStep(cache, link, counters, expert_bytes, prefetch, hybrid if hybrid is not None else NO_HOST)
    router = _CacheAwareReplay(trace, config.cache_aware_routing, cache, counters) \
        if config.cache_aware_routing is not None else None
    compute = link.compute if timed else None
    experts_t = torch.from_numpy(trace.experts.astype(np.int64))
    hidden_t = torch.from_numpy(trace.hidden) if trace.hidden is not None else None
    for rows, step_layers, step_counts, starts in zip(schedule.rows, schedule.experts, schedule.counts,
                                                      schedule.request_starts):
        for request in starts:
            cache.start_request(request)
            prefetch.begin_request()
        prefetch.reset()
        if trace.tokens is not None:
            prefetch.observe_tokens(trace.tokens[rows])
        rows_t = torch.from_numpy(rows)
        routing = experts_t[rows_t]  # [T, L, K]
        phase = int(trace.phase[rows[0]]) if len(rows) else DECODE  # the engine runs one phase per forward
        for layer in range(layers):
            idx = routing[:, layer]  # [T, K]
            if router is not None:
                idx, experts, counts = router.route(rows_t, layer, idx)
            else:
                experts = step_layers[layer]
                counts = step_counts[layer] if step_counts is not None else [1] * len(experts)
            hidden = hidden_t[rows_t, layer] if hidden_t is not None else None
            device_waves = 0
            for wave in step.run(layer, experts, counts, phase, hidden, idx):
                if not wave.on_host:
                    device_waves += 1  # the engine computes here; the link's clock charges it
                elif compute is not None:
                    tokens = dict(zip(experts, counts))
                    seconds = sum(hybrid.host_seconds(tokens[e]) for e in wave.experts)
                    compute(seconds if device_waves else seconds + link.compute_seconds)
    step.sync_counters()
    if timed:
        link.finish()
        moved = link.copies
    else:
        moved = counters.demand_copies + counters.prefetch_copies
    total = link.now if timed else None
    return _result(config, trace, schedule, cache, moved=moved, prefetch=prefetch_outcomes(prefetch),
                   stall=sum(counters.stall_seconds) if timed else None, total=total, counters=counters)


class _CacheAwareReplay:
    """The engine's cache-aware routing on recorded router scores: substitute, then count unique experts."""

    def __init__(self, trace: Trace, delta: float, cache: ExpertCache, counters: StepCounters) -> None:
        self.delta = float(delta)
        self.cache = cache
        self.counters = counters
        self.num_experts = trace.num_experts
        self.scores = torch.from_numpy(trace.scores) if trace.scores is not None else None  # [N, L, E]

    def route(self, rows: torch.Tensor, layer: int, idx: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        if self.scores is not None:
            resident = torch.zeros(self.num_experts, dtype=torch.bool)
            for key in self.cache.resident(layer):
                resident[key.expert] = True
            # The weights ride along unchanged; the replay has no use for them, so the index stands in.
            result = cache_aware_route(self.scores[rows, layer], idx, idx, resident, self.delta)
            self.counters.routing_substitutions += int(result.substitutions)
            idx = result.top_k_index
        unique, counts = torch.unique(idx, return_counts=True)  # as the engine's experts function
        return idx, unique.tolist(), counts.tolist()


def prefetch_outcomes(prefetch: Prefetching | NoPrefetching) -> dict[str, int]:
    """The planner's outcome counts; empty without prefetching (as a replay of the policy alone)."""
    planner = getattr(prefetch, "planner", None)
    return planner.outcomes.as_dict() if planner is not None else {}


def timed_link(config: SimConfig, mover: Callable[[ExpertKey, int], None] | None = None) -> TimedLink:
    """The modelled link of ``config``; with a ``mover`` the live engine runs on the same clock."""
    if config.link_gbps is None or not config.expert_bytes:
        raise ValueError("a link model needs --link-gbps and the expert size (--expert-bytes)")
    seconds = config.link_latency_us * 1e-6 + config.expert_bytes / (config.link_gbps * 1e9)
    return TimedLink(seconds, config.layer_compute_us * 1e-6, mover)


def _result(config: SimConfig, trace: Trace, schedule: Schedule, cache: ExpertCache, *, moved: int,
            prefetch: dict[str, int], stall: float | None = None, total: float | None = None,
            counters: StepCounters | None = None) -> SimResult:
    return SimResult(
        policy=config.policy,
        hits=sum(cache.hits),
        accesses=sum(cache.queries),
        experts_moved=int(moved),
        bytes_moved=int(moved * config.expert_bytes) if config.expert_bytes else None,
        tokens=trace.num_rows,
        steps=len(schedule.experts),
        per_layer_hit_rate=[h / q if q else 0.0 for h, q in zip(cache.hits, cache.queries)],
        prefetch=prefetch,
        stall_seconds=stall,
        total_seconds=total,
        host_computed=counters.cpu_computed if counters is not None else 0,
        routing_substitutions=counters.routing_substitutions if counters is not None else 0,
    )
