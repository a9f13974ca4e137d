"""``prev``: guess that each later layer routes like it did for the previous token.

Design: consecutive decode tokens share many experts at the same layer (the
temporal locality every expert cache lives on), so "what layer l+d used one step
ago" is the cheapest non-trivial prediction and the baseline a learned predictor
has to beat. It needs no training and no hidden states, so it runs offline too.
"""

from __future__ import annotations

import numpy as np
import torch

from cache.base import ExpertKey
from prefetch.base import index_array, register_predictor, scored_top, target_layers


@register_predictor("prev")
class PreviousTokenPredictor:
    def __init__(self, *, num_layers: int, num_experts: int, top_k: int, lookahead: int = 1, **kwargs) -> None:
        self.num_layers = int(num_layers)
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.lookahead = int(lookahead)
        self._prev: list[np.ndarray | None] = [None] * self.num_layers  # per layer: share of tokens per expert
        self._cur: list[np.ndarray | None] = [None] * self.num_layers
        self._tokens = 1

    def begin_request(self) -> None:
        self._prev = [None] * self.num_layers
        self._cur = [None] * self.num_layers

    def reset(self) -> None:
        if any(c is not None for c in self._cur):
            self._prev = self._cur
        self._cur = [None] * self.num_layers

    def observe(self, layer: int, hidden: torch.Tensor | None, top_k_index) -> None:
        idx = index_array(top_k_index)  # [T, K]
        self._tokens = idx.shape[0]
        share = np.bincount(idx.ravel(), minlength=self.num_experts)[: self.num_experts] / idx.shape[0]
        self._cur[layer] = np.minimum(share, 1.0)

    def predict(self, layer: int) -> list[tuple[ExpertKey, float]]:
        out: list[tuple[ExpertKey, float]] = []
        width = self.top_k * self._tokens
        for target in target_layers(layer, self.lookahead, self.num_layers):
            probs = self._prev[target]
            if probs is not None:
                out += scored_top(target, target - layer, probs, width)
        return out
