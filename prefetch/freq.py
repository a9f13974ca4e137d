"""``freq``: guess each later layer's most frequently used experts so far.

Design: routing is skewed (a few experts of each layer take a large share of the
tokens), so a running count per layer is a strong, stateless-per-token baseline.
Counts persist across requests: the skew is a property of the model and the
workload, not of one request.
"""

from __future__ import annotations

import numpy as np
import torch

from cache.base import ExpertKey
from prefetch.base import index_array, register_predictor, scored_top, target_layers


@register_predictor("freq")
class FrequencyPredictor:
    def __init__(self, *, num_layers: int, num_experts: int, top_k: int, lookahead: int = 1, **kwargs) -> None:
        self.num_layers = int(num_layers)
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.lookahead = int(lookahead)
        self.counts = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        self.tokens = np.zeros(self.num_layers, dtype=np.int64)  # tokens seen per layer
        self._step_tokens = 1

    def begin_request(self) -> None:
        return None

    def reset(self) -> None:
        return None

    def observe(self, layer: int, hidden: torch.Tensor | None, top_k_index) -> None:
        idx = index_array(top_k_index)  # [T, K]
        self._step_tokens = idx.shape[0]
        self.counts[layer] += np.bincount(idx.ravel(), minlength=self.num_experts)[: self.num_experts]
        self.tokens[layer] += idx.shape[0]

    def predict(self, layer: int) -> list[tuple[ExpertKey, float]]:
        out: list[tuple[ExpertKey, float]] = []
        width = self.top_k * self._step_tokens
        for target in target_layers(layer, self.lookahead, self.num_layers):
            if self.tokens[target] == 0:
                continue
            share = np.minimum(self.counts[target] / self.tokens[target], 1.0)  # P(a token uses e)
            out += scored_top(target, target - layer, share, width)
        return out
