"""Expected-next-use eviction: a Belady approximation from online statistics.

Design: Belady evicts the expert whose next use is farthest away. We cannot see
the future, but MoE routing makes it estimable from two facts that LRU and LFU
each capture only half of:

1. *Where* the next use can happen. Layers run in order, so an expert of a layer
   the current forward has already passed cannot be needed before the next
   token, while one of the next layer may be needed within microseconds. This is
   the observation behind SpecMD's "Least-Stale" (arXiv 2602.03921): in a cache
   shared by all layers, the experts just used are the stalest.
2. *How likely* a use is per token. Routing is skewed and drifts slowly, so a
   decayed frequency (an exponential moving average with a half-life in tokens)
   estimates it; and consecutive tokens share experts far more often than chance,
   so an expert used by the previous token gets a boost: its layer's measured
   *stickiness*, the share of repeats beyond what the frequencies alone predict
   (learned online), ``p <- p + (1 - p) * stickiness``. That is what LRU gets
   right, without letting a rare expert used once outrank a hot one.

With ``p`` that per-token probability (boosted as above) and ``f`` the fraction
of a forward until the expert's layer comes round again, the expected wait is
``f + (1 - p) / p`` tokens (geometric); the victim is the resident expert with the longest wait,
ties to the least recently touched. With a per-layer cache ``f`` is the same for
every candidate and the policy is decayed LFU with a one-token recency guard.
"""

from __future__ import annotations

from collections.abc import Collection
from collections.abc import Set as AbstractSet

from cache._clock import LayerClock
from cache.base import ExpertKey, lowest_ranked, register_policy


@register_policy("nextuse", shape_args=("num_layers",))
class NextUsePolicy:
    def __init__(self, half_life: float = 128.0, num_layers: int | None = None) -> None:
        if half_life <= 0:
            raise ValueError(f"nextuse half_life must be positive, got {half_life}")
        self._keep = 0.5 ** (1.0 / float(half_life))  # per-tick decay of the moving average
        self._alpha = 1.0 - self._keep
        self.num_layers = num_layers
        self._clock = LayerClock()
        self._p: dict[ExpertKey, float] = {}
        self._p_tick: dict[ExpertKey, int] = {}
        self._touch: dict[ExpertKey, int] = {}
        self._n = 0
        # Per layer: experts of the tick in progress and of the one before, and repeat counts.
        self._cur: dict[int, set[int]] = {}
        self._prev: dict[int, set[int]] = {}
        self._repeat = {}  # layer -> [repeated, total, expected repeats from frequencies]

    # -- statistics ----------------------------------------------------------------
    def _rate(self, key: ExpertKey) -> float:
        p = self._p.get(key, 0.0)
        if p:
            p *= self._keep ** (self._clock.now(key.layer) - self._p_tick[key])
        return p

    def stickiness(self, layer: int) -> float:
        """Probability that a previous-token expert repeats beyond its frequency (0: no temporal locality)."""
        repeated, total, expected = self._repeat.get(layer, (0, 0, 0.0))
        return max(0.0, (repeated - expected + 1.0) / (total - expected + 2.0))

    def on_access(self, key: ExpertKey, hit: bool, step: int) -> None:
        layer = key.layer
        before = self._clock.now(layer)
        now = self._clock.advance(layer, step)
        if now != before:  # the layer's previous tick is complete: update its repeat rate
            done = self._cur.get(layer)
            if done is not None:
                prev = self._prev.get(layer)
                if prev:
                    stats = self._repeat.setdefault(layer, [0, 0, 0.0])
                    stats[0] += len(done & prev)
                    stats[1] += len(prev)
                    stats[2] += sum(min(self._rate(ExpertKey(layer, e)), 1.0) for e in prev)
                self._prev[layer] = done
            self._cur[layer] = set()
        if key.expert not in self._cur[layer]:
            self._cur[layer].add(key.expert)
            self._p[key] = self._rate(key) * self._keep + self._alpha
            self._p_tick[key] = now
        self._n += 1
        self._touch[key] = self._n

    def on_insert(self, key: ExpertKey) -> None:
        self._n += 1
        self._touch[key] = self._n

    def on_evict(self, key: ExpertKey) -> None:
        return None

    # -- the decision --------------------------------------------------------------
    def expected_wait(self, key: ExpertKey) -> float:
        """Expected tokens until ``key`` is used again (larger = better victim)."""
        layer = key.layer
        current = self._clock.current_layer
        num_layers = self.num_layers or self._clock.layers_seen()
        if layer > current:
            frac = (layer - current) / num_layers
            last_done = self._clock.now(layer)
        elif layer < current:
            frac = (num_layers - current + layer) / num_layers
            last_done = self._clock.now(layer)
        else:
            frac = 1.0
            last_done = self._clock.now(layer) - 1
        p = self._rate(key)
        if p <= 1e-9:
            return float("inf")
        if self._p_tick.get(key, -2) >= last_done:  # used by the previous token of its layer
            p = p + (1.0 - p) * self.stickiness(layer)
        return frac + (1.0 - p) / p

    def victim(self, resident: Collection[ExpertKey], protected: AbstractSet[ExpertKey]) -> ExpertKey:
        # longest expected wait first; among equals the least recently touched
        return lowest_ranked(resident, protected, lambda key: (-self.expected_wait(key), self._touch.get(key, 0)))
