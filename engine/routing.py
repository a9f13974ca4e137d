"""Routing hooks of the live engine: cache-aware routing and trace replay.

A hook's ``route(layer, top_k_index, top_k_weights, rows)`` returns a
:class:`~engine.offload.RoutedLayer`: the experts the layer computes, the
router's own choice (what a recorded trace keeps) and, where the hook sees
them, the router's scores (recorded too, so the simulator can replay
cache-aware routing). ``rows`` are the real rows of a padded batch (None: all).

Cache-aware routing (opt-in; it changes outputs with a delta above 0): each
MoE block's router is observed with a forward hook (a documented ``nn.Module``
seam, no patching) so the experts function can see the router probabilities of
the step; ``cache.routing.cache_aware_route`` decides the substitutions from
them and the layer's residency. A trace recorded with it holds the router's
choices before substitution and the scores, which is what a replay needs.
"""

from __future__ import annotations

import torch

from cache.routing import cache_aware_route
from engine.arch import router_of
from engine.offload import RoutedLayer
from traces.format import load_trace


class CacheAwareRouting:
    def __init__(self, cache, counters, blocks: list[torch.nn.Module], num_experts: int, delta: float,
                 record_scores: bool = False) -> None:
        """``record_scores``: hand the scores to the trace recorder even where nothing is substituted."""
        self.delta = float(delta)
        self.record_scores = bool(record_scores)
        self.cache = cache
        self.counters = counters
        self.num_experts = num_experts
        self._scores: list[torch.Tensor | None] = [None] * len(blocks)
        # Sigmoid-scored routers (DeepSeek-V3 style, with a correction bias) are compared on sigmoid scores.
        self._sigmoid = [hasattr(router_of(b), "e_score_correction_bias") for b in blocks]
        self._hooks = [router_of(block).register_forward_hook(self._hook(i)) for i, block in enumerate(blocks)]

    def _hook(self, layer: int):
        def capture(_module, _inputs, output) -> None:
            logits = output[0] if isinstance(output, tuple) else output
            self._scores[layer] = logits.detach()

        return capture

    def route(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
              rows: torch.Tensor | None) -> RoutedLayer:
        logits = self._scores[layer]
        if logits is None or (self.delta == 0 and not self.record_scores):
            return RoutedLayer(top_k_index, top_k_index, None)
        logits = logits.float().reshape(-1, logits.shape[-1])  # [T, E]
        if rows is not None:
            logits = logits[rows]  # [R, E]: padding rows never reach the cache
        scores = logits.sigmoid() if self._sigmoid[layer] else logits.softmax(dim=-1)
        if self.delta == 0:
            return RoutedLayer(top_k_index, top_k_index, scores)
        resident = torch.zeros(self.num_experts, dtype=torch.bool)
        for key in self.cache.resident(layer):
            resident[key.expert] = True
        result = cache_aware_route(scores, top_k_index, top_k_weights, resident.to(scores.device), self.delta)
        self.counters.routing_substitutions += int(result.substitutions)
        return RoutedLayer(result.top_k_index, top_k_index, scores)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


class TraceReplayRouting:
    """Benchmarks only: replace the router's choices with routing replayed from a trace.

    Random-weight models route almost uniformly; replaying a real trace gives a
    real-shape model the temporal and cross-layer structure of real routing, so
    cache and prefetch behaviour (and so speed) are realistic. Rows of each forward
    take the next rows of the trace (wrapping around); a trace with fewer layers or
    experts than the model is mapped by modulo. Outputs are meaningless by design.
    """

    def __init__(self, trace_path: str, shape) -> None:
        trace = load_trace(trace_path, hidden=False)
        if trace.num_rows == 0:
            raise ValueError(f"{trace_path}: the trace has no rows to replay")
        if trace.top_k < shape.top_k:
            raise ValueError(f"{trace_path}: trace top_k {trace.top_k} < model top_k {shape.top_k}")
        experts = torch.from_numpy(trace.experts.astype("int64"))[:, :, : shape.top_k]  # [N, L, K]
        self.experts = experts % shape.num_experts
        self.num_layers = shape.num_layers
        self.cursor = 0
        self._rows = 0

    def route(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
              rows: torch.Tensor | None) -> RoutedLayer:
        T = top_k_index.shape[0]
        n, trace_layers = self.experts.shape[0], self.experts.shape[1]
        rows = (torch.arange(T) + self.cursor) % n
        replay = self.experts[rows, layer % trace_layers]  # [T, K]
        if layer == self.num_layers - 1:
            self.cursor = (self.cursor + T) % n
        replay = replay.to(device=top_k_index.device, dtype=top_k_index.dtype)
        return RoutedLayer(replay, replay, None)

    def close(self) -> None:
        return None
