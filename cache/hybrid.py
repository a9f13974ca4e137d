"""Fetch or compute on the host? The per-miss decision rule of hybrid execution.

At small batch a missed expert can be cheaper to run on the CPU, straight from
its host page, than to copy to the device (llama.cpp's CPU-expert mode,
Fiddler and ktransformers exploit this). The rule compares two times for each
miss: one page copy over the link, and the host kernel on that expert for the
miss's tokens (a fixed part, reading the page, plus a part per token). A miss
with a free slot in its scope is always fetched: it costs no eviction and warms
the cache.

Deciding miss by miss would be myopic: once the cache is full, an expert that is
used again and again would be computed on the host every time and never fetched
once. So the rule rents before it buys (ski rental): a miss goes to the host
while the host time this expert has cost since it was last fetched, this miss
included, stays below one copy; the miss that would reach it fetches the expert.
No expert then costs more than twice what the better of "always host" and
"fetch once" would have cost it.

Design: pure bookkeeping, no tensors, so the live engine (which measures the
times on its machine, ``engine.cost.calibrate``) and the simulator (which is
given them) decide with this very object, through ``cache.step.LayerStep``'s
host chooser hook.
"""

from __future__ import annotations

from cache.manager import ExpertCache

MODES = ("never", "auto", "always")


class HybridCostModel:
    def __init__(self, mode: str, fetch_seconds: float, fixed_seconds: float, token_seconds: float) -> None:
        if mode not in MODES:
            raise ValueError(f"--cpu-compute must be one of {', '.join(MODES)}, got {mode!r}")
        if min(fetch_seconds, fixed_seconds, token_seconds) < 0:
            raise ValueError("hybrid cost model: copy and host times must be >= 0")
        self.mode = mode
        self.fetch_seconds = float(fetch_seconds)
        self.fixed = float(fixed_seconds)
        self.per_token = float(token_seconds)
        self.rent: dict = {}  # ExpertKey -> host seconds spent on it since it was last fetched

    @classmethod
    def from_timings(cls, mode: str, fetch_seconds: float, host_seconds_1: float,
                     host_seconds_16: float) -> HybridCostModel:
        """The model through two measured host times, for 1 and for 16 tokens."""
        per_token = max((host_seconds_16 - host_seconds_1) / 15, 0.0)
        return cls(mode, fetch_seconds, max(host_seconds_1 - per_token, 0.0), per_token)

    def host_seconds(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens

    def prefer_host(self, tokens: int, free_slot: bool, rent: float = 0.0) -> bool:
        if self.mode == "always":
            return True
        if self.mode == "never" or free_slot:
            return False
        return rent + self.host_seconds(tokens) < self.fetch_seconds

    def choose(self, layer: int, experts: list[int], counts: list[int], cache: ExpertCache,
               inflight) -> list[int]:
        """The misses of this step to compute on the host (``cache.step`` host chooser)."""
        out = []
        free = cache.has_free_slot(layer)
        for key, n in zip(cache.keys_of(layer, experts), counts):
            rent = self.rent.pop(key, 0.0)  # resident or on its way: it starts renting afresh
            if key in inflight or cache.is_resident(key):
                continue
            if self.prefer_host(n, free, rent):
                out.append(key.expert)
                self.rent[key] = rent + self.host_seconds(n)
        return out

    def describe(self) -> dict:
        return {"mode": self.mode, "fetch_seconds": self.fetch_seconds, "host_seconds_1": self.host_seconds(1),
                "host_seconds_16": self.host_seconds(16)}
