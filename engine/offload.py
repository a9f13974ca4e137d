"""The offloaded experts function: transformers calls it once per MoE layer per forward.

    top_k_index -> host (the one sync per layer) -> unique experts U
    waves = cache.access(layer, U)        # hits: slots; misses: demand copies on the copy engine
    wait for the copies this wave needs    (time waited = stall, counted)
    out = experts over slots               (grouped compute, cuda_ext op or torch reference)
    predictor.observe -> planner -> prefetch copies for later layers
    trace.record(layer, top_k_index, top_k_weights)   (only when recording)

The runtime owns the slot memory and the copies and calls the policy through
``cache.ExpertCache``; the policy never moves bytes. Counters are plain numbers
on the hot path; metrics are exported from them elsewhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cache.base import ExpertKey
from cache.manager import ExpertCache
from cuda_ext import expert_ffn
from engine.store import HostExpertStore
from engine.transfer import DEMAND, PREFETCH, CopyHandle

PREFILL, DECODE = 0, 1


@dataclass
class EngineCounters:
    """Cumulative counters, exported as metrics and in ``Engine.stats()``."""

    num_layers: int
    queries: list[list[int]] = field(default_factory=list)  # [phase][layer]
    hits: list[list[int]] = field(default_factory=list)  # [phase][layer]
    activations: list[list[int]] = field(default_factory=list)  # [layer][expert] routed (token, expert) pairs
    demand_bytes: int = 0
    prefetch_bytes: int = 0
    demand_copies: int = 0
    stall_seconds: list[float] = field(default_factory=lambda: [0.0, 0.0])  # [phase]
    prefetch_issued: int = 0
    prefetch_useful: int = 0
    prefetch_wasted: int = 0
    prefetch_late: int = 0
    cpu_computed: int = 0
    routing_substitutions: int = 0
    capacity_bytes: int = 0
    used_bytes: int = 0
    forward_steps: int = 0

    @classmethod
    def create(cls, num_layers: int, num_experts: int) -> EngineCounters:
        return cls(
            num_layers=num_layers,
            queries=[[0] * num_layers, [0] * num_layers],
            hits=[[0] * num_layers, [0] * num_layers],
            activations=[[0] * num_experts for _ in range(num_layers)],
        )


def _positions(idx_flat: torch.Tensor, wanted) -> dict[int, int | torch.Tensor]:
    """expert -> its positions in the flattened [T*K] routing (an int when there is exactly one)."""
    if idx_flat.numel() <= 64:  # decode: a Python pass beats one tensor op per expert
        groups: dict[int, list[int]] = {}
        for p, e in enumerate(idx_flat.tolist()):
            if e in wanted:
                groups.setdefault(e, []).append(p)
        return {e: (ps[0] if len(ps) == 1 else torch.tensor(ps)) for e, ps in groups.items()}
    out = {}
    for e in wanted:
        pos = (idx_flat == e).nonzero().squeeze(1)
        if pos.numel():
            out[e] = pos
    return out


@dataclass
class ActiveStep:
    """What the generation loop told us about the rows of the current forward."""

    valid_rows: torch.Tensor | None  # device indices of real (non-padding) rows, None: all rows
    phase: int


class OffloadRuntime:
    def __init__(self, store: HostExpertStore, cache: ExpertCache, transfer, device: torch.device,
                 num_experts: int, page_bytes: int) -> None:
        self.store = store
        self.cache = cache
        self.transfer = transfer
        self.device = device
        self.num_experts = num_experts
        self.page_bytes = page_bytes
        self.slots = torch.empty((cache.num_slots, store.page_elems), dtype=store.dtype, device=device)
        self.slot_parts = {name: store.part(self.slots, name) for name, _, _ in store.offsets}
        self.counters = EngineCounters.create(store.num_layers, num_experts)
        self.counters.capacity_bytes = self.slots.numel() * self.slots.element_size()
        self.step = 0  # global (forward, layer) access counter: the policy's clock
        self.active: ActiveStep | None = None
        self.recorder = None
        self.predictor = None
        self.planner = None
        self.inflight: dict[ExpertKey, CopyHandle] = {}
        self.routing = None  # cache-aware routing hook (engine.routing), None when off
        self.hybrid = None  # engine.cost.HybridCostModel when misses may run on the host
        self._layout = store.layout

    # -- the experts function ------------------------------------------------------------
    def forward(self, module: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        active = self.active
        if self.routing is not None:
            top_k_index = self.routing.substitute(module._moepager_layer, top_k_index, top_k_weights)
        if active is not None and active.valid_rows is not None:
            rows = active.valid_rows  # [R]: padding rows route too, but must not touch the cache
            out = torch.zeros_like(hidden)
            if rows.numel():
                out[rows] = self._forward_rows(module, hidden[rows], top_k_index[rows], top_k_weights[rows],
                                               active.phase)
            return out
        phase = active.phase if active is not None else (PREFILL if hidden.shape[0] > 1 else DECODE)
        return self._forward_rows(module, hidden, top_k_index, top_k_weights, phase)

    def _forward_rows(self, module, hidden, top_k_index, top_k_weights, phase: int) -> torch.Tensor:
        layer = module._moepager_layer
        counters = self.counters
        idx_host = top_k_index.to("cpu")  # sync: routing decides which experts must be resident  [T, K]
        unique_t, counts_t = torch.unique(idx_host, return_counts=True)
        unique, counts = unique_t.tolist(), counts_t.tolist()
        step = self.step
        self.step += 1
        act = counters.activations[layer]
        for e, n in zip(unique, counts):
            act[e] += n
        planner = self.planner
        if planner is not None:
            self._poll_prefetches()
            for e in unique:
                planner.on_access(ExpertKey(layer, e))
        on_host: list[int] = []
        if self.hybrid is not None:
            on_host = self._host_misses(layer, unique, counts)
            if on_host:
                self.cache.bypass(layer, on_host, step)
                counters.queries[phase][layer] += len(on_host)
                counters.cpu_computed += len(on_host)
                skip = set(on_host)
                unique = [e for e in unique if e not in skip]
        waves = self.cache.access(layer, unique, step, pinned=self.inflight.keys()) if unique else []
        T, K = idx_host.shape
        weighted = torch.zeros((T * K, hidden.shape[-1]), dtype=torch.promote_types(hidden.dtype, top_k_weights.dtype),
                               device=hidden.device)  # [T*K, H]
        weights_flat = top_k_weights.reshape(-1)  # [T*K]
        idx_flat = idx_host.reshape(-1)  # [T*K]
        prefetch_pending = self.predictor is not None
        for wave in waves:
            waits = []
            for key, slot, evicted in wave.misses:
                if evicted is not None and planner is not None:
                    planner.on_evict(evicted)
                waits.append(self.transfer.copy(key, slot, self.store.page(layer, key.expert), self.slots[slot],
                                                 DEMAND))
                counters.demand_bytes += self.page_bytes
                counters.demand_copies += 1
            if prefetch_pending:
                # Plan as soon as the demand copies are queued: later layers' copies then overlap this
                # layer's wait and compute instead of starting a layer late.
                self._prefetch(layer, hidden, top_k_index, unique)
                prefetch_pending = False
            for key, _slot in wave.hits:
                pending = self.inflight.pop(key, None)
                if pending is not None and not pending.done():
                    self.transfer.promote(pending)  # a late prefetch: now a demand copy
                    waits.append(pending)
            counters.queries[phase][layer] += len(wave.hits) + len(wave.misses)
            counters.hits[phase][layer] += len(wave.hits)
            if waits:
                t0 = time.perf_counter()
                for handle in waits:
                    self.transfer.wait(handle)
                counters.stall_seconds[phase] += time.perf_counter() - t0
            self._compute_wave(module, hidden, idx_flat, weights_flat, weighted, wave.slots(), K)
        if on_host:
            self._compute_on_host(module, hidden, idx_flat, weights_flat, weighted, layer, on_host, K)
        self.transfer.after_compute()
        counters.used_bytes = self.cache.used_slots() * self.page_bytes
        if self.recorder is not None:
            self.recorder.record(layer, top_k_index, top_k_weights, hidden)
        if prefetch_pending:  # no wave ran (every miss computed on the host)
            self._prefetch(layer, hidden, top_k_index, unique)
        return weighted.view(T, K, -1).sum(dim=1).to(hidden.dtype)  # [T, H]

    def _compute_wave(self, module, hidden, idx_flat, weights_flat, weighted, expert_slots: dict[int, int],
                      K: int) -> None:
        parts = self.slot_parts
        lay = self._layout
        gate_up, down = parts["gate_up_proj"], parts["down_proj"]
        gate_up_bias = parts["gate_up_proj_bias"] if lay.has_bias else None
        down_bias = parts["down_proj_bias"] if lay.has_bias else None
        positions = _positions(idx_flat, expert_slots)  # expert -> positions in T*K (host)
        for expert, slot in expert_slots.items():
            pos = positions.get(expert)
            if pos is None:
                continue
            if isinstance(pos, int):  # one token (batch-1 decode): no gather, no index tensors
                row = pos // K
                x = hidden[row : row + 1]  # [1, H]
            else:
                pos = pos.to(hidden.device, non_blocking=True)
                x = hidden[pos // K]  # [n, H]
            y = module._moepager_ffn(
                module, x, gate_up[slot], down[slot],
                gate_up_bias[slot] if gate_up_bias is not None else None,
                down_bias[slot] if down_bias is not None else None,
                lay.is_transposed,
            )  # [n, H]
            if isinstance(pos, int):
                weighted[pos] = y[0] * weights_flat[pos]
            else:
                weighted[pos] = y * weights_flat[pos].unsqueeze(-1)

    # -- hybrid execution ---------------------------------------------------------------
    def _host_misses(self, layer: int, unique: list[int], counts: list[int]) -> list[int]:
        """Misses the cost model sends to the host instead of fetching."""
        cache, hybrid, inflight = self.cache, self.hybrid, self.inflight
        out = []
        free = cache.has_free_slot(layer)
        for e, n in zip(unique, counts):
            key = ExpertKey(layer, e)
            if cache.is_resident(key) or key in inflight:
                continue
            if hybrid.prefer_host(n, free):
                out.append(e)
        return out

    def _compute_on_host(self, module, hidden, idx_flat, weights_flat, weighted, layer: int, experts: list[int],
                         K: int) -> None:
        lay = self._layout
        store = self.store
        for expert in experts:
            pos = (idx_flat == expert).nonzero().squeeze(1)  # host [n]
            page = store.page(layer, expert)
            x = hidden[(pos // K).to(hidden.device)].to("cpu")  # [n, H]
            y = expert_ffn(
                module, x, store.part(page, "gate_up_proj"), store.part(page, "down_proj"),
                store.part(page, "gate_up_proj_bias") if lay.has_bias else None,
                store.part(page, "down_proj_bias") if lay.has_bias else None,
                lay.is_transposed,
            )  # [n, H] on the host
            pos = pos.to(hidden.device)
            weighted[pos] = y.to(hidden.device) * weights_flat[pos].unsqueeze(-1)

    # -- prefetch -----------------------------------------------------------------------
    def _poll_prefetches(self) -> None:
        for key, handle in list(self.inflight.items()):
            if handle.done():
                self.planner.on_complete(key)
                del self.inflight[key]

    def _prefetch(self, layer: int, hidden, top_k_index, unique: list[int]) -> None:
        planner = self.planner
        counters = self.counters
        for key in planner.stale(layer):
            handle = self.inflight.get(key)
            if handle is not None and self.transfer.cancel(handle):
                del self.inflight[key]
                self.cache.evict(key)
                planner.on_cancel(key)
        self.predictor.observe(layer, hidden, top_k_index)
        needed_now = {ExpertKey(layer, e) for e in unique}
        for key, slot, _evicted in planner.plan(self.predictor.predict(layer), self.cache, needed_now):
            self.inflight[key] = self.transfer.copy(key, slot, self.store.page(key.layer, key.expert),
                                                    self.slots[slot], PREFETCH)
            counters.prefetch_bytes += self.page_bytes
        out = planner.outcomes
        counters.prefetch_issued, counters.prefetch_useful = out.issued, out.useful
        counters.prefetch_wasted, counters.prefetch_late = out.wasted, out.late

    def drain(self) -> None:
        """Wait for every copy in flight (used before swapping policies and at shutdown)."""
        for handle in self.inflight.values():
            self.transfer.wait(handle)
        if self.planner is not None:
            for key in list(self.inflight):
                self.planner.on_complete(key)
        self.inflight.clear()
