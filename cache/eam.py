"""Activation-aware eviction after MoE-Infinity: match this request against past ones.

Design: every request builds an expert activation matrix (EAM, layers x experts,
counts of how often each expert was routed to). Requests about similar things
route similarly, so the current request's EAM is matched by cosine similarity
against the EAMs of recent finished requests; the best match says which experts
this request is still likely to need. An expert's keep-priority is

    current_share[l, e] + similarity * matched_share[l, e]

(each share normalised per layer), ties to the least recently used. The match
is recomputed once per tick of the first layer (once per token), not per miss.

Request boundaries come from the optional ``on_request_start(request_id)`` hook
(the engine and the simulator call it). Without it the stream is cut into
pseudo-requests of ``window`` tokens, so the policy still adapts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from collections.abc import Set as AbstractSet

import numpy as np

from cache._clock import LayerClock
from cache.base import ExpertKey, register_policy


@register_policy("eam", shape_args=("num_layers", "num_experts"))
class EAMPolicy:
    def __init__(self, num_layers: int = 1, num_experts: int = 1, history: int = 64, window: int = 256) -> None:
        self._eam = np.zeros((max(num_layers, 1), max(num_experts, 1)), dtype=np.float64)
        self._past: deque[np.ndarray] = deque(maxlen=max(history, 1))
        self.window = int(window)
        self._clock = LayerClock()
        self._explicit_requests = False
        self._tokens_in_request = 0
        self._first_layer: int | None = None
        self._matched: np.ndarray | None = None  # similarity * matched request's shares, per token
        self._touch: dict[ExpertKey, int] = {}
        self._n = 0

    # -- request boundaries --------------------------------------------------------
    def on_request_start(self, request_id: object = None) -> None:
        self._explicit_requests = True
        self._finish_request()

    def _finish_request(self) -> None:
        if self._eam.any():
            self._past.append(self._eam.copy())
        self._eam[:] = 0.0
        self._tokens_in_request = 0
        self._matched = None

    # -- bookkeeping ----------------------------------------------------------------
    def _grow(self, key: ExpertKey) -> None:
        rows, cols = self._eam.shape
        if key.layer < rows and key.expert < cols:
            return
        shape = (max(rows, key.layer + 1), max(cols, key.expert + 1))

        def pad(m: np.ndarray) -> np.ndarray:
            out = np.zeros(shape, dtype=m.dtype)
            out[: m.shape[0], : m.shape[1]] = m
            return out

        self._eam = pad(self._eam)
        self._past = deque((pad(m) for m in self._past), maxlen=self._past.maxlen)
        self._matched = None

    def on_access(self, key: ExpertKey, hit: bool, step: int) -> None:
        self._grow(key)
        if self._first_layer is None:
            self._first_layer = key.layer
        before = self._clock.now(key.layer)
        if self._clock.advance(key.layer, step) != before and key.layer == self._first_layer:
            self._tokens_in_request += 1
            if not self._explicit_requests and self._tokens_in_request > self.window:
                self._finish_request()
                self._tokens_in_request = 1
            self._matched = None  # re-match once per token
        self._eam[key.layer, key.expert] += 1.0
        self._n += 1
        self._touch[key] = self._n

    def on_insert(self, key: ExpertKey) -> None:
        self._grow(key)
        self._n += 1
        self._touch[key] = self._n

    def on_evict(self, key: ExpertKey) -> None:
        return None

    def _compute_matched(self) -> np.ndarray:
        if not self._past:
            return np.zeros_like(self._eam)
        past = np.stack(self._past)  # [R, L, E]
        flat = past.reshape(len(past), -1)
        cur = self._eam.reshape(-1)
        if cur.any():
            norms = np.linalg.norm(flat, axis=1) * np.linalg.norm(cur)
            sims = flat @ cur / np.maximum(norms, 1e-12)
            best = int(np.argmax(sims))
            similarity = float(sims[best])
        else:  # nothing seen yet in this request: trust the latest one
            best, similarity = len(past) - 1, 1.0
        matched = past[best]
        return similarity * matched / np.maximum(matched.sum(axis=1, keepdims=True), 1e-12)

    def victim(self, resident: Collection[ExpertKey], protected: AbstractSet[ExpertKey]) -> ExpertKey:
        if self._matched is None:
            self._matched = self._compute_matched()
        matched = self._matched
        eam = self._eam
        row_total = eam.sum(axis=1)
        best = None
        best_rank = None
        for key in resident:
            if key in protected:
                continue
            current = eam[key.layer, key.expert] / row_total[key.layer] if row_total[key.layer] else 0.0
            rank = (current + matched[key.layer, key.expert], self._touch.get(key, 0))
            if best_rank is None or rank < best_rank:
                best, best_rank = key, rank
        if best is None:
            raise RuntimeError("no evictable expert: every resident expert is protected")
        return best
