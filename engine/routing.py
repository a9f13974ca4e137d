"""Cache-aware routing in the live engine (opt-in; it changes outputs).

Each MoE block's router is observed with a forward hook (a documented
``nn.Module`` seam, no patching) so the experts function can see the router
probabilities of the step; ``cache.routing.cache_aware_route`` decides the
substitutions from them and the layer's residency.
"""

from __future__ import annotations

import torch

from cache.routing import cache_aware_route
from engine.arch import router_of
from traces.format import load_trace


class CacheAwareRouting:
    def __init__(self, cache, counters, blocks: list[torch.nn.Module], num_experts: int, delta: float) -> None:
        self.delta = float(delta)
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

    def substitute(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        logits = self._scores[layer]
        if logits is None or self.delta == 0:
            return top_k_index
        logits = logits.float().reshape(-1, logits.shape[-1])  # [T, E]
        scores = logits.sigmoid() if self._sigmoid[layer] else logits.softmax(dim=-1)
        resident = torch.zeros(self.num_experts, dtype=torch.bool)
        for key in self.cache.resident(layer):
            resident[key.expert] = True
        result = cache_aware_route(scores, top_k_index, top_k_weights, resident.to(scores.device), self.delta)
        self.counters.routing_substitutions += int(result.substitutions)
        return result.top_k_index

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

    def substitute(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        T = top_k_index.shape[0]
        n, trace_layers = self.experts.shape[0], self.experts.shape[1]
        rows = (torch.arange(T) + self.cursor) % n
        replay = self.experts[rows, layer % trace_layers]  # [T, K]
        if layer == self.num_layers - 1:
            self.cursor = (self.cursor + T) % n
        return replay.to(device=top_k_index.device, dtype=top_k_index.dtype)

    def close(self) -> None:
        return None
