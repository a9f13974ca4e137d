"""``oracle``: the true future, read from a trace. Offline only: the simulator's upper bound.

Design: the simulator knows every step's routing in advance, so the oracle
shows how much a perfect predictor would gain under the same planner, budget and
link; the gap between it and a real predictor is what better prediction can
still buy.

``trace`` is the routing ``experts [N, L, K]`` (one forward per row, in order),
or a pair ``(experts, order)`` where ``order`` lists, per forward, the row
indices it processes (e.g. all prompt rows of a prefill in one forward). Each
``reset()`` moves to the next forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cache.base import ExpertKey
from prefetch.base import index_array, register_predictor, target_layers


@register_predictor("oracle", offline_only=True)
class OraclePredictor:
    def __init__(self, *, num_layers: int, num_experts: int, top_k: int, lookahead: int = 1,
                 trace=None, **kwargs) -> None:
        if trace is None:
            raise ValueError("the oracle predictor needs the trace's future (trace=experts or (experts, order)); "
                             "it exists only in the offline simulator")
        if isinstance(trace, tuple):
            experts, order = trace
        else:
            experts, order = trace, None
        self.experts = np.asarray(experts, dtype=np.int64)  # [N, L, K]
        if self.experts.ndim != 3:
            raise ValueError(f"oracle trace must be experts [N, L, K], got shape {self.experts.shape}")
        self.order: Sequence[Sequence[int]] = (
            [[i] for i in range(self.experts.shape[0])] if order is None else [list(map(int, s)) for s in order]
        )
        self.num_layers = int(num_layers)
        self.num_experts = int(num_experts)
        self.lookahead = int(lookahead)
        self.step = -1  # index into order; the first reset() (or observe) starts forward 0

    def begin_request(self) -> None:
        return None

    def reset(self) -> None:
        self.step += 1

    def observe(self, layer: int, hidden: torch.Tensor | None, top_k_index) -> None:
        self.step = max(self.step, 0)
        if self.step >= len(self.order):
            raise ValueError(f"oracle ran past the end of its trace ({len(self.order)} forwards)")
        rows = self.order[self.step]
        if len(rows) != index_array(top_k_index).shape[0]:
            raise ValueError(f"oracle forward {self.step} has {len(rows)} rows but observed "
                             f"{index_array(top_k_index).shape[0]} tokens: trace and run disagree")

    def predict(self, layer: int) -> list[tuple[ExpertKey, float]]:
        rows = self.order[max(self.step, 0)]
        out: list[tuple[ExpertKey, float]] = []
        for target in target_layers(layer, self.lookahead, self.num_layers):
            used = np.unique(self.experts[rows, target].ravel())
            out += [(ExpertKey(target, int(e)), 1.0 / (target - layer)) for e in used if e >= 0]
        return out
