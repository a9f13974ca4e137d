"""``eam``: MoE-Infinity's expert-activation-matrix matching.

Design: requests with similar content route similarly across the whole depth of
the model. Each request keeps an activation matrix (layers x experts, token
counts); finished requests go into a bounded bank. At layer l the current
request's rows 0..l are matched against the bank's by cosine similarity, and the
best matches' rows for layers l+1..l+D, blended with the current request's own
counts at those layers, give the prediction. It needs no training and no hidden
states; the bank fills online and can be seeded from a trace
(``bank=(experts [N, L, K], request [N])``).

Request boundaries come from ``begin_request()``; without them the whole run is
one request and the predictor degrades to per-layer frequencies.
"""

from __future__ import annotations

import numpy as np
import torch

from cache.base import ExpertKey
from prefetch.base import index_array, register_predictor, scored_top, target_layers


@register_predictor("eam")
class ActivationMatrixPredictor:
    def __init__(self, *, num_layers: int, num_experts: int, top_k: int, lookahead: int = 1,
                 bank=None, bank_size: int = 256, matches: int = 4, own_prior_tokens: float = 4.0,
                 **kwargs) -> None:
        self.num_layers = int(num_layers)
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.lookahead = int(lookahead)
        self.matches = int(matches)
        self.own_prior_tokens = float(own_prior_tokens)
        self.bank = np.zeros((int(bank_size), self.num_layers, self.num_experts), dtype=np.float32)
        self.bank_len = 0  # filled entries
        self._next = 0  # ring position of the next insert (oldest entry once full)
        self.cur = np.zeros((self.num_layers, self.num_experts), dtype=np.float32)  # this request's counts
        self._tokens_before = np.zeros(self.num_layers, dtype=np.float32)  # tokens per layer before this step
        self._step_tokens = 1
        if bank is not None:
            self.seed(*bank)

    # -- the bank --------------------------------------------------------------
    def add_to_bank(self, matrix: np.ndarray) -> None:
        if matrix.sum() <= 0:
            return
        self.bank[self._next] = matrix
        self._next = (self._next + 1) % self.bank.shape[0]
        self.bank_len = min(self.bank_len + 1, self.bank.shape[0])

    def seed(self, experts: np.ndarray, request: np.ndarray) -> None:
        """Add one activation matrix per request of a trace (later requests win when the bank is full)."""
        experts = np.asarray(experts, dtype=np.int64)
        request = np.asarray(request)
        _, first = np.unique(request, return_index=True)
        for rid in request[np.sort(first)]:
            rows = experts[request == rid]  # [n, L, K]
            m = np.zeros((self.num_layers, self.num_experts), dtype=np.float32)
            for layer in range(self.num_layers):
                m[layer] = np.bincount(rows[:, layer].ravel(), minlength=self.num_experts)[: self.num_experts]
            self.add_to_bank(m)

    # -- the predictor protocol ------------------------------------------------------
    def begin_request(self) -> None:
        self.add_to_bank(self.cur)
        self.cur = np.zeros_like(self.cur)
        self._tokens_before[:] = 0

    def reset(self) -> None:
        self._tokens_before = self.cur.sum(axis=1) / self.top_k

    def observe(self, layer: int, hidden: torch.Tensor | None, top_k_index) -> None:
        idx = index_array(top_k_index)  # [T, K]
        self._step_tokens = idx.shape[0]
        self.cur[layer] += np.bincount(idx.ravel(), minlength=self.num_experts)[: self.num_experts]

    def predict(self, layer: int) -> list[tuple[ExpertKey, float]]:
        targets = target_layers(layer, self.lookahead, self.num_layers)
        if not targets:
            return []
        weights, matched = self._match(layer)
        out: list[tuple[ExpertKey, float]] = []
        for target in targets:
            dist = np.zeros(self.num_experts, dtype=np.float64)
            if matched is not None:
                rows = matched[:, target].astype(np.float64)  # [m, E]
                rows /= np.maximum(rows.sum(axis=1, keepdims=True), 1e-9)
                dist = weights @ rows
            own_tokens = float(self._tokens_before[target])
            if own_tokens > 0:
                own = self.cur[target] / max(self.cur[target].sum(), 1e-9)
                a = own_tokens / (own_tokens + self.own_prior_tokens) if matched is not None else 1.0
                dist = (1 - a) * dist + a * own
            if dist.sum() <= 0:
                continue
            probs = np.minimum(dist * self.top_k, 1.0)  # expected share of tokens using each expert
            out += scored_top(target, target - layer, probs, self.top_k * self._step_tokens)
        return out

    def _match(self, layer: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Similarity weights [m] (summing to 1) and the best-matching bank matrices [m, L, E]."""
        if self.bank_len == 0:
            return np.zeros(0), None
        bank = self.bank[: self.bank_len]
        query = self.cur[: layer + 1].ravel()
        keys = bank[:, : layer + 1].reshape(self.bank_len, -1)  # [B, (l+1)*E]
        sims = keys @ query / (np.linalg.norm(keys, axis=1) * max(np.linalg.norm(query), 1e-9) + 1e-9)
        m = min(self.matches, self.bank_len)
        best = np.argpartition(-sims, m - 1)[:m]
        w = np.maximum(sims[best], 0.0).astype(np.float64)
        if w.sum() <= 0:
            return np.zeros(0), None
        return w / w.sum(), bank[best]
