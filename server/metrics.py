"""Prometheus metrics: serving metrics updated by the scheduler, offload metrics read from
``engine.counters`` at scrape time.

Design: one ``CollectorRegistry`` per app (several apps can live in one process, as in the
tests). The hot path only bumps plain numbers in ``engine.counters``; ``EngineCollector``
turns them into counter/gauge families when Prometheus scrapes, so exporting costs nothing
per token. Labels are bounded (layer, phase, kind, reason): never an expert or request id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "moepager_"
PHASES = ("prefill", "decode")

# vLLM's buckets (vllm/engine/metrics.py), so dashboards built for vLLM read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)

# Every metric name this module exports (without the _total/_bucket suffixes Prometheus adds).
SERVING_METRICS = ("num_requests_running", "num_requests_waiting", "time_to_first_token_seconds",
                   "inter_token_latency_seconds", "e2e_request_latency_seconds", "prompt_tokens_total",
                   "generation_tokens_total", "request_success_total", "requests_rejected_total",
                   "kv_cache_used_bytes", "kv_cache_reserved_bytes", "kv_cache_budget_bytes")
OFFLOAD_METRICS = ("expert_cache_queries_total", "expert_cache_hits_total", "expert_transfer_bytes_total",
                   "expert_stall_seconds_total", "expert_prefetch_issued_total", "expert_prefetch_useful_total",
                   "expert_prefetch_wasted_total", "expert_prefetch_late_total", "expert_cache_capacity_bytes",
                   "expert_cache_used_bytes", "expert_cpu_computed_total",
                   "expert_quantized_bytes_saved_total")


def _phase_name(phase: int) -> str:
    return PHASES[phase] if 0 <= phase < len(PHASES) else str(phase)


def _per_layer(table: Any) -> Iterator[tuple[str, str, float]]:
    """Yield (phase, layer, value) from ``table[phase][layer]`` (lists or dicts)."""
    phases = table.items() if isinstance(table, dict) else enumerate(table)
    for phase, layers in phases:
        items = layers.items() if isinstance(layers, dict) else enumerate(layers)
        for layer, value in items:
            yield _phase_name(int(phase)), str(layer), float(value)


def _per_phase(table: Any) -> Iterator[tuple[str, float]]:
    items = table.items() if isinstance(table, dict) else enumerate(table)
    for phase, value in items:
        yield _phase_name(int(phase)), float(value)


class EngineCollector(Collector):
    """Exports ``engine.counters`` at scrape time; families exist (empty) before the model loads."""

    def __init__(self, get_engine: Callable[[], Any]) -> None:
        self._get_engine = get_engine

    def collect(self) -> Iterator[Any]:
        engine = self._get_engine()
        c = getattr(engine, "counters", None) if engine is not None else None

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name.removesuffix("_total"), doc, labels=list(labels))

        queries = counter("expert_cache_queries_total", "Expert lookups in the slot cache", ("layer", "phase"))
        hits = counter("expert_cache_hits_total", "Expert lookups that found the expert resident",
                       ("layer", "phase"))
        transfer = counter("expert_transfer_bytes_total", "Bytes copied host to device", ("kind",))
        stall = counter("expert_stall_seconds_total", "Time compute waited on expert copies", ("phase",))
        saved = counter("expert_quantized_bytes_saved_total",
                        "Bytes quantized expert pages saved against pages in the compute dtype", ("kind",))
        simple = {
            "prefetch_issued": counter("expert_prefetch_issued_total", "Prefetch copies issued"),
            "prefetch_useful": counter("expert_prefetch_useful_total", "Prefetched experts used before eviction"),
            "prefetch_wasted": counter("expert_prefetch_wasted_total", "Prefetched experts evicted unused"),
            "prefetch_late": counter("expert_prefetch_late_total", "Prefetches still in flight when needed"),
            "cpu_computed": counter("expert_cpu_computed_total", "Missed experts computed on the CPU"),
        }
        capacity = GaugeMetricFamily(PREFIX + "expert_cache_capacity_bytes", "Device bytes of expert slots")
        used = GaugeMetricFamily(PREFIX + "expert_cache_used_bytes", "Device bytes of occupied expert slots")
        if c is not None:
            for phase, layer, value in _per_layer(getattr(c, "queries", ())):
                queries.add_metric([layer, phase], value)
            for phase, layer, value in _per_layer(getattr(c, "hits", ())):
                hits.add_metric([layer, phase], value)
            transfer.add_metric(["demand"], float(getattr(c, "demand_bytes", 0)))
            transfer.add_metric(["prefetch"], float(getattr(c, "prefetch_bytes", 0)))
            for phase, value in _per_phase(getattr(c, "stall_seconds", ())):
                stall.add_metric([phase], value)
            if hasattr(c, "bytes_saved"):
                for kind, value in c.bytes_saved().items():
                    saved.add_metric([kind], float(value))
            for attr, family in simple.items():
                family.add_metric([], float(getattr(c, attr, 0)))
            capacity.add_metric([], float(getattr(c, "capacity_bytes", 0)))
            used.add_metric([], float(getattr(c, "used_bytes", 0)))
        yield from (queries, hits, transfer, stall, saved, *simple.values(), capacity, used)


class ServerMetrics:
    """All metrics of one app, in its own registry."""

    def __init__(self, get_engine: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge(PREFIX + "num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Sequences waiting for a batch slot", registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last token",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Finished sequences",
                                       ["finished_reason"], registry=r)
        self.requests_rejected = Counter(PREFIX + "requests_rejected", "Requests refused before generation",
                                         ["reason"], registry=r)
        self.kv_used = Gauge(PREFIX + "kv_cache_used_bytes", "Bytes held by the KV cache of the running batch",
                             registry=r)
        self.kv_reserved = Gauge(PREFIX + "kv_cache_reserved_bytes",
                                 "KV bytes reserved by admitted sequences (worst case: prompt + max tokens)",
                                 registry=r)
        self.kv_budget = Gauge(PREFIX + "kv_cache_budget_bytes", "KV cache budget (--kv-cache-gb)", registry=r)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(finished_reason=reason)
        for reason in ("invalid_request", "unauthorized", "not_found", "queue_full", "unavailable", "kv_budget"):
            self.requests_rejected.labels(reason=reason)
        r.register(EngineCollector(get_engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
