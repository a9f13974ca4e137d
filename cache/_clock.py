"""Per-layer clocks for policies that measure age in "uses of this layer" rather than raw steps.

The global ``step`` counter advances once per (forward, layer) access, so raw step
gaps scale with the number of layers. A layer's own tick advances once per
forward that reaches it, i.e. once per token in single-token decode, which is the
unit every frequency and recency parameter of the policies is expressed in.
"""

from __future__ import annotations


class LayerClock:
    __slots__ = ("_last_step", "_tick", "current_layer")

    def __init__(self) -> None:
        self._tick: dict[int, int] = {}
        self._last_step: dict[int, int] = {}
        self.current_layer = 0

    def advance(self, layer: int, step: int) -> int:
        """Called on every access; returns the layer's tick (all keys of one step share it)."""
        self.current_layer = layer
        if self._last_step.get(layer) != step:
            self._last_step[layer] = step
            self._tick[layer] = self._tick.get(layer, 0) + 1
        return self._tick[layer]

    def now(self, layer: int) -> int:
        return self._tick.get(layer, 0)

    def layers_seen(self) -> int:
        return max(len(self._tick), 1)
