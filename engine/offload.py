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

import torch

from cache.step import DECODE, PREFILL, LayerStep, StepCounters, Wave
from cuda_ext import expert_ffn

EngineCounters = StepCounters  # the name the server and benchmarks know

__all__ = ["DECODE", "PREFILL", "ActiveStep", "EngineCounters", "OffloadRuntime", "PageTable", "Routing",
           "TorchExpertCompute"]


def routing_to_host(top_k_index: torch.Tensor) -> torch.Tensor:
    """The one host sync per layer (tests wrap it to allow exactly this sync)."""
    return top_k_index.to("cpu")


@dataclass
class ActiveStep:
    """What the generation loop told us about the rows of the current forward."""

    valid_rows: torch.Tensor | None  # device indices of real (non-padding) rows, None: all rows
    phase: int


class PageTable:
    """Rows of expert pages viewed as the experts' tensors: the device slot pool, or the host store.

    ``row(layer, expert, slot)`` is where a wave's expert is read: its slot in the pool, or, when
    the table is the host store (CPU zero copy, host-computed misses), the expert's own page.
    """

    def __init__(self, store, pages: torch.Tensor, by_slot: bool) -> None:
        lay = store.layout
        self.pages = pages  # [N, page_elems]
        self.gate_up = store.part(pages, "gate_up_proj")  # [N, ...]
        self.down = store.part(pages, "down_proj")  # [N, ...]
        self.gate_up_bias = store.part(pages, "gate_up_proj_bias") if lay.has_bias else None
        self.down_bias = store.part(pages, "down_proj_bias") if lay.has_bias else None
        self.transposed = lay.is_transposed
        self.by_slot = by_slot
        self.num_experts = store.num_experts

    def rows(self, wave: Wave) -> list[int]:
        if self.by_slot:
            return wave.slots
        base = wave.layer * self.num_experts
        return [base + e for e in wave.experts]


class Routing:
    """One layer's routing, on the host and on the device, with each expert's token positions.

    Positions come from one stable sort of the flattened routing: expert ``e``'s positions are
    ``order[start_e : start_e + count_e]``, with start and count known on the host, so slicing the
    device copy of ``order`` needs no sync.
    """

    __slots__ = ("K", "_order_dev", "idx", "order", "span", "weights")

    def __init__(self, idx_host: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts: list[int],
                 counts: list[int]) -> None:
        self.K = idx_host.shape[1]
        self.idx = idx  # [T, K] device
        self.weights = weights.reshape(-1)  # [T*K] device
        order = torch.argsort(idx_host.reshape(-1), stable=True)  # [T*K] host
        self.order = order.tolist()
        self._order_dev = order if idx.device.type == "cpu" else None
        span, start = {}, 0
        for e, n in zip(experts, counts):
            span[e] = (start, n)
            start += n
        self.span = span

    def positions(self, start: int, n: int) -> torch.Tensor:
        """Positions [n] in T*K of one expert's tokens, on the device."""
        if self._order_dev is None:  # computed on the device from the device routing: no host copy
            self._order_dev = torch.argsort(self.idx.reshape(-1), stable=True)
        return self._order_dev[start : start + n]


class TorchExpertCompute:
    """The reference strategy: one expert at a time, gathered tokens, the module's expert FFN.

    A per-layer op (``moe_ffn`` over page rows and a ``[T, K]`` row index) plugs in as another
    strategy with the same call.
    """

    def __call__(self, module, hidden: torch.Tensor, routing: Routing, table: PageTable, experts: list[int],
                 rows: list[int], out: torch.Tensor) -> None:
        K, order, span, w = routing.K, routing.order, routing.span, routing.weights
        to_host = table.pages.device != hidden.device  # host-computed misses on a GPU machine
        ffn = expert_ffn if to_host else module._moepager_ffn
        gate_up, down, gate_up_bias, down_bias = table.gate_up, table.down, table.gate_up_bias, table.down_bias
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
            y = ffn(module, x, gate_up[row], down[row], gate_up_bias[row] if gate_up_bias is not None else None,
                    down_bias[row] if down_bias is not None else None, table.transposed)  # [n, H]
            if to_host:
                y = y.to(hidden.device)
            if n == 1:
                out[pos] = y[0] * w[pos]
            else:
                out[pos] = y * w[pos].unsqueeze(-1)


class KeepRouting:
    """No routing change (the default): cache-aware routing and trace replay are the alternatives."""

    def substitute(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return top_k_index

    def close(self) -> None:
        return None


class NoRecorder:
    def begin_step(self, *args) -> None:
        return None

    def record(self, layer: int, top_k_index, top_k_weights, hidden) -> None:
        return None

    def end_step(self) -> None:
        return None

    def close(self) -> None:
        return None


class OffloadRuntime:
    """Everything the experts function needs, assembled once (``engine.build.build_runtime``)."""

    def __init__(self, step: LayerStep, slot_table: PageTable, host_table: PageTable, compute, routing,
                 recorder, link) -> None:
        self.step = step
        self.cache = step.cache
        self.counters: StepCounters = step.counters
        self.prefetching = step.prefetching
        self.slot_table = slot_table
        self.host_table = host_table
        self.compute = compute
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
        idx_host = routing_to_host(top_k_index)  # sync: routing decides which experts must be resident  [T, K]
        unique_t, counts_t = torch.unique(idx_host, return_counts=True)
        experts, counts = unique_t.tolist(), counts_t.tolist()  # [U], [U]
        T, K = idx_host.shape
        routing = Routing(idx_host, top_k_index, top_k_weights, experts, counts)
        out = torch.zeros((T * K, hidden.shape[-1]), dtype=torch.promote_types(hidden.dtype, top_k_weights.dtype),
                          device=hidden.device)  # [T*K, H]
        for wave in self.step.run(layer, experts, counts, phase, hidden, idx_host):
            table = self.host_table if wave.on_host else self.slot_table
            self.compute(module, hidden, routing, table, wave.experts, table.rows(wave), out)
        self.recorder.record(layer, top_k_index, top_k_weights, hidden)
        return out.view(T, K, -1).sum(dim=1).to(hidden.dtype)  # [T, H]

    def drain(self) -> None:
        """Wait for every copy in flight (used before swapping policies and at shutdown)."""
        self.step.drain()
