"""Fetch or compute on the host? The per-miss cost model of hybrid execution.

At small batch a missed expert can be cheaper to run on the CPU, straight from
its host page, than to copy to the device (llama.cpp's CPU-expert mode,
Fiddler and ktransformers exploit this). Both sides are measured once at
start-up on this machine: one page copy over the real (or emulated) link, and
the reference expert kernel on the host for 1 and 16 tokens; a miss goes to the
host when its predicted host time is below the copy time. A miss with a free
slot in its scope is always fetched: it costs no eviction and warms the cache.
"""

from __future__ import annotations

import time

import torch

from engine.offload import LayerOutput, PageTable, Routing

MODES = ("never", "auto", "always")


class HybridCostModel:
    def __init__(self, mode: str, fetch_seconds: float, host_seconds_1: float, host_seconds_16: float) -> None:
        if mode not in MODES:
            raise ValueError(f"--cpu-compute must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.fetch_seconds = fetch_seconds
        self.per_token = max((host_seconds_16 - host_seconds_1) / 15, 0.0)
        self.fixed = max(host_seconds_1 - self.per_token, 0.0)

    def host_seconds(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens

    def prefer_host(self, tokens: int, free_slot: bool) -> bool:
        if self.mode == "always":
            return True
        if self.mode == "never" or free_slot:
            return False
        return self.host_seconds(tokens) < self.fetch_seconds

    def choose(self, layer: int, experts: list[int], counts: list[int], cache, inflight) -> list[int]:
        """The misses of this step to compute on the host (``cache.step`` host chooser)."""
        out = []
        free = cache.has_free_slot(layer)
        for key, n in zip(cache.keys_of(layer, experts), counts):
            if key in inflight or cache.is_resident(key):
                continue
            if self.prefer_host(n, free):
                out.append(key.expert)
        return out

    def describe(self) -> dict:
        return {"mode": self.mode, "fetch_seconds": self.fetch_seconds, "host_seconds_1": self.host_seconds(1),
                "host_seconds_16": self.host_seconds(16)}


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
        return HybridCostModel(mode, fetch, host_time(1), host_time(16))
