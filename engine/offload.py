"""The offloaded experts function: transformers calls it once per MoE layer per forward.

    top_k_index -> host (the one sync per layer) -> unique experts U
    for wave in step.run(layer, U):       # cache.step: hits, demand copies, prefetch plan, wait (stall)
        compute(wave)                      # experts over the wave's page rows (torch reference or one op)
    recorder.record(...)                   (a no-op unless recording)

The runtime is assembled once by ``engine.build`` from parts chosen at
construction (link, page tables, compute strategy, routing hook, recorder);
it never branches on a feature being on. The per-layer protocol itself lives
in ``cache.step.LayerStep``, shared with the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from cache.step import DECODE, PREFILL, LayerStep, StepCounters, Wave
from cuda_ext import expert_ffn

EngineCounters = StepCounters  # the name the server and benchmarks know

__all__ = ["DECODE", "PREFILL", "ActiveStep", "EngineCounters", "LayerOutput", "OffloadRuntime", "PageTable",
           "RoutedLayer", "Routing", "TorchExpertCompute"]


def routing_to_host(top_k_index: torch.Tensor) -> torch.Tensor:
    """The one host sync per layer (tests wrap it to allow exactly this sync)."""
    return top_k_index.to("cpu")


# Routings of up to this many (token, slot) pairs (a few decode tokens) are tallied and looked up in
# Python: cheaper there than a sort or index op each.
SMALL_ROUTING = 256


def unique_experts(idx_host: torch.Tensor) -> tuple[list[int], list[int]]:
    """The routed experts, ascending, and each one's number of (token, slot) pairs."""
    if idx_host.numel() > SMALL_ROUTING:
        unique_t, counts_t = torch.unique(idx_host, return_counts=True)
        return unique_t.tolist(), counts_t.tolist()
    tally: dict[int, int] = {}
    for e in idx_host.reshape(-1).tolist():
        tally[e] = tally.get(e, 0) + 1
    experts = sorted(tally)
    return experts, [tally[e] for e in experts]


@dataclass
class ActiveStep:
    """What the generation loop told us about the rows of the current forward."""

    valid_rows: torch.Tensor | None  # device indices of real (non-padding) rows, None: all rows
    phase: int


class PageTable:
    """Rows of expert pages: the device slot pool, or the host store; ``expert(row)`` views one as tensors.

    ``rows(wave)`` is where a wave's experts are read: their slots in the pool, or, when the table
    is the host store (CPU zero copy, host-computed misses), the experts' own pages. Float pages in
    the compute dtype are viewed in place; quantized pages are dequantized per expert on their device.
    """

    def __init__(self, store, pages: torch.Tensor, by_slot: bool) -> None:
        self.pages = pages  # uint8 [N, page_bytes]
        self.fmt = store.fmt
        self.dtype = store.dtype
        self.views = store.float_views(pages)  # (gate_up [N, ...], down [N, ...], biases) or None
        self.transposed = store.layout.is_transposed
        self.by_slot = by_slot
        self.num_experts = store.num_experts

    def rows(self, wave: Wave) -> list[int]:
        if self.by_slot:
            return wave.slots
        base = wave.layer * self.num_experts
        return [base + e for e in wave.experts]

    def expert(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(gate_up, down, gate_up_bias, down_bias) of the page in ``row``, module layout, compute dtype."""
        views = self.views
        if views is None:
            return self.fmt.unpack(self.pages[row], self.dtype)
        gate_up, down, b1, b2 = views
        return gate_up[row], down[row], None if b1 is None else b1[row], None if b2 is None else b2[row]


class Routing:
    """One layer's routing, on the host and on the device, with each expert's token positions.

    Positions come from one stable sort of the flattened routing: expert ``e``'s positions are
    ``order[start_e : start_e + count_e]``, with start and count known on the host, so slicing the
    device copy of ``order`` needs no sync. The sort is made on first use: per-layer ops (the native
    ``moe_ffn``) read the routing itself and never need it.
    """

    __slots__ = ("K", "_counts", "_experts", "_host", "_order", "_order_dev", "_span", "idx", "idx_host",
                 "top_k_weights", "weights")

    def __init__(self, idx_host: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts: list[int],
                 counts: list[int]) -> None:
        self.K = idx_host.shape[1]
        self.idx = idx  # [T, K] device
        self.idx_host = idx_host  # [T, K] host
        self.top_k_weights = weights  # [T, K] device
        self.weights = weights.reshape(-1)  # [T*K] device
        self._experts, self._counts = experts, counts
        self._order: list[int] | None = None
        self._order_dev: torch.Tensor | None = None
        self._span: dict[int, tuple[int, int]] | None = None
        self._host = None

    @property
    def order(self) -> list[int]:
        """Positions in T*K, grouped by expert (ascending), in token order within an expert."""
        if self._order is None:
            order = torch.argsort(self.idx_host.reshape(-1), stable=True)  # [T*K] host
            self._order = order.tolist()
            if self.idx.device.type == "cpu":
                self._order_dev = order
        return self._order

    @property
    def span(self) -> dict[int, tuple[int, int]]:
        """expert -> (start, count) of its positions in :attr:`order`."""
        if self._span is None:
            span, start = {}, 0
            for e, n in zip(self._experts, self._counts):
                span[e] = (start, n)
                start += n
            self._span = span
        return self._span

    def positions(self, start: int, n: int) -> torch.Tensor:
        """Positions [n] in T*K of one expert's tokens, on the device."""
        if self._order_dev is None:
            if self.idx.device.type == "cpu":
                self._order_dev = torch.argsort(self.idx_host.reshape(-1), stable=True)
            else:  # computed on the device from the device routing: no host copy
                self._order_dev = torch.argsort(self.idx.reshape(-1), stable=True)
        return self._order_dev[start : start + n]

    def on_host(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [T, H], routing weights [T, K] fp32) on the host, copied once per layer."""
        if self._host is None:
            self._host = (hidden.to("cpu"), self.top_k_weights.to("cpu", torch.float32))
        return self._host


class LayerOutput:
    """The layer's routed-expert output, filled by one or more waves.

    Per-expert strategies write weighted rows into ``per_position`` ``[T*K, H]`` (summed over K at
    the end, as transformers does); per-layer ops add their ``[T, H]`` sums.
    """

    __slots__ = ("K", "T", "device", "dtype", "hidden", "per_position", "summed")

    def __init__(self, T: int, K: int, hidden: int, dtype: torch.dtype, device: torch.device) -> None:
        self.T, self.K, self.hidden, self.dtype, self.device = T, K, hidden, dtype, device
        self.per_position: torch.Tensor | None = None
        self.summed: torch.Tensor | None = None

    def positions(self) -> torch.Tensor:
        if self.per_position is None:
            self.per_position = torch.zeros((self.T * self.K, self.hidden), dtype=self.dtype, device=self.device)
        return self.per_position  # [T*K, H]

    def add(self, y: torch.Tensor) -> None:
        y = y.to(self.device)  # [T, H]
        self.summed = y if self.summed is None else self.summed.float() + y

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        out = self.summed
        if self.per_position is not None:
            per = self.per_position.view(self.T, self.K, -1).sum(dim=1)  # [T, H]
            out = per if out is None else per + out
        if out is None:
            out = torch.zeros((self.T, self.hidden), dtype=dtype, device=self.device)
        return out.to(dtype)


class TorchExpertCompute:
    """The reference strategy: one expert at a time, gathered tokens, the module's expert FFN."""

    def __call__(self, module, hidden: torch.Tensor, routing: Routing, table: PageTable, experts: list[int],
                 rows: list[int], out: LayerOutput) -> None:
        K, order, span, w = routing.K, routing.order, routing.span, routing.weights
        to_host = table.pages.device != hidden.device  # host-computed misses on a GPU machine
        ffn = expert_ffn if to_host else module._moepager_ffn
        per_position = out.positions()
        for expert, row in zip(experts, rows):
            start, n = span[expert]
            if n == 1:  # one token (batch-1 decode): no gather, no index tensors
                pos = order[start]
                x = hidden[pos // K : pos // K + 1]  # [1, H]
            else:
                pos = routing.positions(start, n)  # [n] device
                x = hidden[pos // K]  # [n, H]
            if to_host:
                x = x.to("cpu")  # sync: hybrid execution computes on the host, by choice of the cost model
            gate_up, down, gate_up_bias, down_bias = table.expert(row)
            y = ffn(module, x, gate_up, down, gate_up_bias, down_bias, table.transposed)  # [n, H]
            if to_host:
                y = y.to(hidden.device)
            if n == 1:
                per_position[pos] = y[0] * w[pos]
            else:
                per_position[pos] = y * w[pos].unsqueeze(-1)


class RoutedLayer(NamedTuple):
    """A routing hook's answer for one layer (``engine.routing``)."""

    top_k_index: torch.Tensor  # [T, K] the experts the layer computes
    router_index: torch.Tensor  # [T, K] the router's choice: what a recorded trace keeps
    scores: torch.Tensor | None  # [T, E] router probabilities, where the hook sees them


class KeepRouting:
    """No routing change (the default): cache-aware routing and trace replay are the alternatives."""

    def route(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
              rows: torch.Tensor | None) -> RoutedLayer:
        return RoutedLayer(top_k_index, top_k_index, None)

    def close(self) -> None:
        return None


class NoRecorder:
    def begin_step(self, *args) -> None:
        return None

    def record(self, layer: int, top_k_index, top_k_weights, hidden, scores=None) -> None:
        return None

    def end_step(self) -> None:
        return None

    def close(self) -> None:
        return None


def _copy_to_host(hidden: torch.Tensor, routing: Routing) -> None:
    routing.on_host(hidden)  # sync: the host computes misses concurrently with the device's waves


def _no_copy(hidden: torch.Tensor, routing: Routing) -> None:
    return None


class OffloadRuntime:
    """Everything the experts function needs, assembled once (``engine.build.build_runtime``)."""

    def __init__(self, step: LayerStep, slot_table: PageTable, host_table: PageTable, compute, host_compute,
                 routing, recorder, link, copy_ahead: bool = False) -> None:
        """``compute`` runs waves read from ``slot_table``, ``host_compute`` the host-computed misses.

        ``copy_ahead``: misses may run on the host of a GPU machine; the layer's input then goes to
        the host right after the routing sync, before the device waves are queued, so the host
        computes its share while the device computes the rest.
        """
        self.step = step
        self.cache = step.cache
        self.counters: StepCounters = step.counters
        self.prefetching = step.prefetching
        self.slot_table = slot_table
        self.host_table = host_table
        self.compute = compute
        self.host_compute = host_compute
        self.early_host_copy = _copy_to_host if copy_ahead else _no_copy
        self.routing = routing
        self.recorder = recorder
        self.link = link
        self.active: ActiveStep | None = None  # set by the generation loop around each forward

    @property
    def slots(self) -> torch.Tensor:
        """The device slot pool's memory (empty on the CPU zero-copy path: a slot is the host page)."""
        return self.slot_table.pages if self.slot_table.by_slot else self.slot_table.pages[:0]

    # -- the experts function ------------------------------------------------------------
    def forward(self, module: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        active = self.active
        if active is not None and active.valid_rows is not None:
            rows = active.valid_rows  # [R]: padding rows route too, but must not touch the cache
            out = torch.zeros_like(hidden)
            if rows.numel():
                out[rows] = self._forward_rows(module, hidden[rows], top_k_index[rows], top_k_weights[rows],
                                               active.phase, rows)
            return out
        phase = active.phase if active is not None else (PREFILL if hidden.shape[0] > 1 else DECODE)
        return self._forward_rows(module, hidden, top_k_index, top_k_weights, phase, None)

    def _forward_rows(self, module, hidden, top_k_index, top_k_weights, phase: int, rows) -> torch.Tensor:
        layer = module._moepager_layer
        routed = self.routing.route(layer, top_k_index, top_k_weights, rows)
        top_k_index = routed.top_k_index
        idx_host = routing_to_host(top_k_index)  # sync: routing decides which experts must be resident  [T, K]
        experts, counts = unique_experts(idx_host)  # [U], [U]
        T, K = idx_host.shape
        routing = Routing(idx_host, top_k_index, top_k_weights, experts, counts)
        out = LayerOutput(T, K, hidden.shape[-1], torch.promote_types(hidden.dtype, top_k_weights.dtype),
                          hidden.device)
        self.early_host_copy(hidden, routing)
        for wave in self.step.run(layer, experts, counts, phase, hidden, idx_host):
            if wave.on_host:
                self.host_compute(module, hidden, routing, self.host_table, wave.experts,
                                  self.host_table.rows(wave), out)
            else:
                self.compute(module, hidden, routing, self.slot_table, wave.experts, self.slot_table.rows(wave), out)
        self.recorder.record(layer, routed.router_index, top_k_weights, hidden, routed.scores)
        return out.result(hidden.dtype)  # [T, H]

    def drain(self) -> None:
        """Wait for every copy in flight (used before swapping policies and at shutdown)."""
        self.step.drain()
