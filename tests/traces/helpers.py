"""Building small traces by hand for the tests."""

from __future__ import annotations

import numpy as np

from traces.format import Trace


def make_trace(experts, num_experts, request=None, step=None, hidden_size=None) -> Trace:
    ex = np.asarray(experts, dtype=np.int16)
    if ex.ndim == 2:  # [N, L] -> K = 1
        ex = ex[:, :, None]
    n, layers, k = ex.shape
    request = np.zeros(n, np.int32) if request is None else np.asarray(request, np.int32)
    hidden = None
    if hidden_size:
        hidden = np.random.default_rng(0).standard_normal((n, layers, hidden_size)).astype(np.float16)
    return Trace(
        experts=ex,
        weights=np.full(ex.shape, 1.0 / k, np.float16),
        request=request,
        position=np.arange(n, dtype=np.int32),
        phase=np.ones(n, np.int8),
        step=None if step is None else np.asarray(step, np.int32),
        hidden=hidden,
        meta={"experts": num_experts, "top_k": k, "model": "hand", "moe_layers": list(range(layers))},
    )
