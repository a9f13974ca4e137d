"""Assembling the offload runtime once: configuration in, immutable parts out.

Every choice the configuration makes (slot memory or zero copy, which link,
predictor and planner or none, host compute or none, routing hook, recorder) is
resolved here into one object per role; the hot path then calls those objects
and never asks whether a feature is on. Policies and predictors are built only
through their public registries, from one frozen ``cache.shape.ModelShape``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cache.base import ExpertKey
from cache.manager import ExpertCache
from cache.shape import ModelShape, build_policy_for
from cache.step import NO_HOST, InstantLink, LayerStep, NoPrefetching, Prefetching, StepCounters
from engine.arch import router_of
from engine.config import EngineConfig
from engine.cost import calibrate
from engine.errors import BudgetError, MoepagerError
from engine.host_compute import host_compute_for
from engine.offload import KeepRouting, NoRecorder, OffloadRuntime, PageTable, TorchExpertCompute
from engine.routing import CacheAwareRouting, TraceReplayRouting
from engine.transfer import CudaLink, ThreadLink, TorchCuda
from prefetch.base import build_predictor
from prefetch.base import is_offline_only as predictor_offline_only
from prefetch.planner import PrefetchPlanner
from traces.recorder import TraceRecorder
from traces.simulate import warm_if_everything_fits

LinkFactory = Callable[[Any, torch.Tensor], Any]  # (store, slots) -> cache.step.Link


@dataclass(frozen=True)
class RuntimeParts:
    shape: ModelShape
    cache: ExpertCache
    link: Any
    runtime: OffloadRuntime
    recorder: Any
    hybrid: Any  # engine.cost.HybridCostModel, or None when every miss is fetched
    zero_copy: bool


def _top_k_of(router: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda hidden: router(hidden)[2]  # [T, H] -> top_k_index [T, K]


def build_policy(name: str, shape: ModelShape):
    return build_policy_for(name, shape)


def _slot_memory(store, num_slots: int, device: torch.device) -> torch.Tensor:
    try:
        return torch.empty((num_slots, store.page_bytes), dtype=torch.uint8, device=device)
    except torch.OutOfMemoryError:
        raise BudgetError(
            f"{num_slots} expert slots ({num_slots * store.page_bytes / 1e9:.2f} GB) do not fit on {device} next "
            f"to the dense weights; lower --expert-slots / --expert-cache-gb") from None


def _link(config: EngineConfig, store, slots: torch.Tensor, device: torch.device,
          link_factory: LinkFactory | None):
    if link_factory is not None:
        return link_factory(store, slots)
    if device.type == "cuda":
        return CudaLink(store, slots, TorchCuda(device))
    return ThreadLink(store, slots, config.emulate_link_gbps, config.emulate_link_latency_us)


def build_runtime(config: EngineConfig, loaded, device: torch.device, capacities: list[int], *,
                  model_name: str, link_factory: LinkFactory | None = None) -> RuntimeParts:
    store = loaded.store
    blocks = [block for _, block, _ in loaded.moe_blocks]
    shape = ModelShape(store.num_layers, store.num_experts, loaded.top_k, store.page_bytes)
    cache = ExpertCache(build_policy(config.cache_policy, shape), shape.num_layers, capacities, config.cache_scope,
                        shape.num_experts)
    counters = StepCounters.create(shape.num_layers, shape.num_experts)
    counters.capacity_bytes = cache.num_slots * store.page_bytes
    counters.page_bytes_saved = store.page_bytes_saved()

    # 1) where a slot lives: the host page itself (CPU, no link to emulate) or a pool of slot memory
    zero_copy = (device.type == "cpu" and link_factory is None and config.emulate_link_gbps is None
                 and config.emulate_link_latency_us == 0)
    host_table = PageTable(store, store.pages, by_slot=False)
    if zero_copy:
        link = InstantLink()
        slot_table = host_table
    else:
        slots = _slot_memory(store, cache.num_slots, device)
        link = _link(config, store, slots, device, link_factory)
        slot_table = PageTable(store, slots, by_slot=True)

    # 2) how experts read from host pages are computed (builds the native kernels, with a progress
    #    line), and which misses are computed there (hybrid execution) rather than fetched
    host_compute = host_compute_for(store, loaded.moe_blocks[0][2], progress=config.progress)
    hybrid = None
    host = NO_HOST
    if config.cpu_compute != "never":
        hybrid = host = calibrate(config.cpu_compute, store, device, loaded.moe_blocks[0][2], host_table,
                                  host_compute, zero_copy, config.emulate_link_gbps, config.emulate_link_latency_us)

    # 3) prefetching: predictor + planner, or none
    prefetching: Prefetching | NoPrefetching = NoPrefetching()
    if config.prefetch != "none":
        if predictor_offline_only(config.prefetch):
            raise MoepagerError(f"--prefetch {config.prefetch} needs the future: simulator only")
        routers = [_top_k_of(router_of(block)) for block in blocks]
        predictor = build_predictor(config.prefetch, **shape.predictor_kwargs(config.prefetch_lookahead),
                                    routers=routers, path=config.predictor_path)
        # Default: one token's worth of experts for each predicted layer; more only queues copies
        # behind each other so they land late.
        budget = (config.prefetch_budget_mb * 1e6 if config.prefetch_budget_mb is not None
                  else shape.top_k * config.prefetch_lookahead * store.page_bytes)
        planner = PrefetchPlanner(store.page_bytes, int(budget), gate=config.prefetch_gate)
        prefetching = Prefetching(predictor, planner, cache, link, counters, store.page_bytes)

    # 4) routing hook and recorder
    if config.route_from_trace is not None and config.cache_aware_routing is not None:
        raise MoepagerError("--route-from-trace and --cache-aware-routing cannot be combined")
    routing: Any = KeepRouting()
    if config.route_from_trace is not None:
        routing = TraceReplayRouting(config.route_from_trace, shape)
    elif config.cache_aware_routing is not None:
        routing = CacheAwareRouting(cache, counters, blocks, shape.num_experts, config.cache_aware_routing,
                                    record_scores=config.record_trace is not None)
    recorder: Any = NoRecorder()
    if config.record_trace is not None:
        meta = {"model": model_name, "architecture": loaded.model.config.model_type,
                "moe_layers": [layer for layer, _, _ in loaded.moe_blocks], "experts": shape.num_experts,
                "top_k": shape.top_k}
        recorder = TraceRecorder(config.record_trace, meta)

    step = LayerStep(cache, link, counters, store.page_bytes, prefetching, host)
    slot_compute = host_compute if slot_table.pages.device.type == "cpu" else TorchExpertCompute()
    runtime = OffloadRuntime(step, slot_table, host_table, slot_compute, host_compute, routing, recorder, link,
                             copy_ahead=hybrid is not None and device.type != "cpu")
    if cache.num_slots >= shape.num_layers * shape.num_experts:
        _warm_all_slots(cache, link, shape, counters, store.page_bytes)
    return RuntimeParts(shape, cache, link, runtime, recorder, hybrid, zero_copy)


def _warm_all_slots(cache: ExpertCache, link, shape: ModelShape, counters: StepCounters, page_bytes: int) -> None:
    """Every expert fits: copy them all in at start-up, so no request ever waits on a cold miss."""
    warm_if_everything_fits(cache, shape.num_layers, shape.num_experts)  # the simulator starts full the same way
    handles = []
    for layer in range(shape.num_layers):
        for expert in range(shape.num_experts):
            key = ExpertKey(layer, expert)
            handles.append(link.demand(key, cache.slot_of(key)))
    link.drain(handles)
    counters.used_bytes = cache.used_slots() * page_bytes
