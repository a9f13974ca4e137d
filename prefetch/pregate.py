"""``pregate``: training-free pre-gating from the current hidden state.

Design: the residual stream changes slowly from layer to layer, so applying the
routers of layers l+1..l+D to layer l's hidden state predicts their routing well
(Pre-gated MoE, AdapMoE) without any training. The engine supplies the real
routers (DeepSeek correction bias and grouped top-k included), so the guess uses
exactly the selection rule of the layer it predicts. Needs hidden states and
router weights: live engine only.

Scores: a token's rank-r expert (of K) counts ``1 - r / (2K)``, summed over the T
tokens of the step and divided by T, so an expert every token ranks first scores
1 and the planner fetches the experts most tokens rely on most first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from cache.base import ExpertKey
from prefetch.base import index_array, register_predictor, scored_top, target_layers


@register_predictor("pregate")
class PreGatePredictor:
    def __init__(self, *, num_layers: int, num_experts: int, top_k: int, lookahead: int = 1,
                 routers: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None, **kwargs) -> None:
        if routers is None:
            raise ValueError("the pregate predictor needs the model's routers and hidden states: it runs only in "
                             "the live engine (offline, use learned, eam, prev or freq)")
        if len(routers) != num_layers:
            raise ValueError(f"pregate needs one router per MoE layer ({num_layers}), got {len(routers)}")
        self.routers = list(routers)
        self.num_layers = int(num_layers)
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.lookahead = int(lookahead)
        self._guesses: dict[int, np.ndarray] = {}  # target layer -> top_k_index [T, K] guessed from the hidden
        self._rank_weight = 1.0 - np.arange(self.top_k) / (2.0 * self.top_k)  # [K]

    def begin_request(self) -> None:
        return None

    def reset(self) -> None:
        self._guesses = {}

    @torch.no_grad()
    def observe(self, layer: int, hidden: torch.Tensor | None, top_k_index) -> None:
        if hidden is None:
            raise ValueError("pregate needs the hidden state at every MoE layer; this run passes none")
        targets = target_layers(layer, self.lookahead, self.num_layers)
        if not targets:
            self._guesses = {}
            return
        guesses = [self.routers[t](hidden) for t in targets]  # each [T, K], on the hidden's device
        # sync: one copy of every guess to the host, so the planner can read them.
        stacked = index_array(torch.cat([g.reshape(g.shape[0], -1) for g in guesses], dim=1))  # [T, D*K]
        k = stacked.shape[1] // len(targets)
        self._guesses = {t: stacked[:, i * k:(i + 1) * k] for i, t in enumerate(targets)}

    def predict(self, layer: int) -> list[tuple[ExpertKey, float]]:
        out: list[tuple[ExpertKey, float]] = []
        for target, idx in self._guesses.items():
            tokens, k = idx.shape
            weights = np.broadcast_to(self._rank_weight[:k] if k <= self.top_k else np.ones(k), idx.shape)
            score = np.bincount(idx.ravel(), weights=weights.ravel(), minlength=self.num_experts)[: self.num_experts]
            out += scored_top(target, target - layer, score / tokens, self.top_k * tokens)
        return out
