"""Synthetic routing with learnable structure, for predictor tests.

Layer l+1's experts are a fixed permutation of layer l's (with probability
``1 - noise`` per slot), and a request's layer-0 experts repeat from the previous
token with probability ``stick``: both cross-layer and temporal structure.
"""

from __future__ import annotations

import numpy as np


def synthetic_routing(requests: int = 40, tokens: int = 30, layers: int = 6, experts: int = 16, top_k: int = 2,
                      noise: float = 0.15, stick: float = 0.6, prompt: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(experts) for _ in range(layers)]
    rows, req, phase = [], [], []
    for r in range(requests):
        last = None
        for t in range(tokens):
            first = rng.choice(experts, top_k, replace=False) if last is None or rng.random() > stick else last
            token = [first]
            for layer in range(1, layers):
                nxt = list(perms[layer][token[-1]])
                for k in range(top_k):
                    if rng.random() < noise:
                        nxt[k] = rng.integers(experts)
                # keep the K experts of a layer distinct
                seen: list[int] = []
                for e in nxt:
                    while e in seen:
                        e = (e + 1) % experts
                    seen.append(int(e))
                token.append(np.array(seen))
            last = first
            rows.append(np.stack(token))
            req.append(r)
            phase.append(0 if t < prompt else 1)
    return (np.stack(rows).astype(np.int16), np.array(req, dtype=np.int32), np.array(phase, dtype=np.int8))


def path_routing(requests: int = 30, tokens: int = 24, layers: int = 6, experts: int = 16, top_k: int = 2,
                 noise: float = 0.05, prompt: int = 4, seed: int = 0):
    """Routing whose path through the layers is only predictable from several layers at once.

    Each layer has two fixed expert sets; a token picks freely at layers 0 and 1,
    and at layer l >= 2 takes set ``b[l-1] XOR b[l-2]`` (flipped with probability
    ``noise``). Any one earlier layer says nothing about the next one; two do.
    """
    rng = np.random.default_rng(seed)
    sets = np.stack([rng.permutation(experts)[: 2 * top_k].reshape(2, top_k) for _ in range(layers)])  # [L, 2, K]
    n = requests * tokens
    bits = np.zeros((n, layers), dtype=np.int64)
    bits[:, :2] = rng.integers(2, size=(n, 2))
    for layer in range(2, layers):
        bits[:, layer] = bits[:, layer - 1] ^ bits[:, layer - 2] ^ (rng.random(n) < noise)
    routing = sets[np.arange(layers)[None, :], bits]  # [N, L, K]
    request = np.repeat(np.arange(requests), tokens).astype(np.int32)
    phase = np.tile((np.arange(tokens) >= prompt).astype(np.int8), requests)
    return routing.astype(np.int16), request, phase
