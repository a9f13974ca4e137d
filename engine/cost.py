"""Hybrid execution's cost model, measured on this machine at start-up.

The decision rule (fetch a miss or compute it on the host) is
``cache.hybrid.HybridCostModel``, shared with the simulator. Its two inputs
are measured here once: one page copy over the real (or emulated) link, and
the host's expert kernel on one expert for 1 and 16 tokens.
"""

from __future__ import annotations

import time

import torch

from cache.hybrid import MODES, HybridCostModel
from engine.offload import LayerOutput, PageTable, Routing

__all__ = ["MODES", "HybridCostModel", "calibrate"]


def calibrate(mode: str, store, device: torch.device, module: torch.nn.Module, table: PageTable, compute,
              zero_copy: bool, link_gbps: float | None, latency_us: float, repeats: int = 5) -> HybridCostModel:
    """Measure one page copy and ``compute`` (the host strategy, reading ``table``, the host pages) on
    one expert; returns the model for ``mode``."""
    page = store.page(0, 0)
    lay = store.layout

    def host_time(tokens: int) -> float:
        # The host kernel that will serve misses, on one expert's page, as the hot path calls it.
        x = torch.randn(tokens, lay.hidden, dtype=store.dtype)
        idx = torch.zeros((tokens, 1), dtype=torch.int64)
        routing = Routing(idx, idx, torch.ones((tokens, 1)), [0], [tokens])
        best = float("inf")
        for _ in range(repeats):
            out = LayerOutput(tokens, 1, lay.hidden, torch.float32, x.device)
            t0 = time.perf_counter()
            compute(module, x, routing, table, [0], [0], out)
            best = min(best, time.perf_counter() - t0)
        return best

    if link_gbps is not None:
        fetch = latency_us * 1e-6 + store.page_bytes / (link_gbps * 1e9)
    elif zero_copy:
        fetch = 0.0  # a slot is the host page: fetching costs nothing
    else:
        dst = torch.empty_like(page, device=device)
        best = float("inf")
        for _ in range(repeats):
            if dst.is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(page, non_blocking=True)
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                dst.copy_(page)
                best = min(best, time.perf_counter() - t0)
        del dst
        fetch = best + latency_us * 1e-6
    with torch.no_grad():
        return HybridCostModel.from_timings(mode, fetch, host_time(1), host_time(16))
