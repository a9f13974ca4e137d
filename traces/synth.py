"""Synthetic routing traces with tunable regimes, deterministic by seed.

Design: a policy or predictor that wins on one trace and loses on another is not
done, and real routing traces are not available to judge on. So traces are
generated from a handful of knobs, each one a property that some policy exploits
and another ignores, and every table is taken over a grid of regimes:

- ``skew``: Zipf exponent of each layer's expert popularity (0: uniform), with
  ``skew_spread`` varying it across layers (layer ``l`` gets ``skew * (1 + s_l)``,
  ``s_l`` spread evenly over ``[-skew_spread, +skew_spread]``);
- ``locality``: the chance that each expert of the previous token (same layer,
  same request) is routed again, varied across layers by ``locality_spread``;
- ``cross_layer``: the chance that each expert of layer ``l-1`` is followed by
  its fixed successor at layer ``l`` (a path through the layers);
- ``topics`` and ``topic_weight``: each request draws a topic whose own
  popularity takes ``topic_weight`` of the routing mass (request-level shifts);
- ``drift``: per token and layer, the chance that a hot expert trades its
  popularity with a random one (the popular set moves over time);
- ``token_weight``: every row carries a token id, drawn Zipf(1) from ``vocab``
  ids; each id has its own popularity per layer (a Zipf profile of exponent
  ``TOKEN_SKEW`` over a permutation of the experts: a token favours a few
  experts per layer), which takes ``token_weight`` of the row's routing mass
  (routing that depends on the token itself, as real routers' does). At 0 the
  ids are drawn but carry no signal;
- ``requests``, ``prompt_len``, ``decode_len`` (means; lengths vary +-50 %):
  a request's prompt is one prefill step (phase 0, all rows sharing a step) and
  each decode token is its own step, as the engine records them.

Within a token and layer the experts are: the previous token's that repeat, then
successors of the layer above, then draws without replacement from the mixed
popularity (Gumbel top-k), up to ``top_k`` distinct experts.

Router scores (``scores=True``, for cache-aware routing): a softmax over logits
drawn as the experts are, the request's popularity at its start (drift is not
followed) plus Gumbel noise, from a generator of their own (the routing is the
same with or without them). The drawn logits are then reassigned so that the
routed experts hold the top ``top_k`` values in router order and the others
keep their relative order below: the gaps between a routed expert and the
runners-up, which decide a substitution, are those of a Gumbel top-k draw.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from traces.format import Trace

TOKEN_SKEW = 2.0


@dataclass(frozen=True)
class SynthConfig:
    layers: int = 8
    experts: int = 64
    top_k: int = 6
    requests: int = 24
    prompt_len: int = 48
    decode_len: int = 96
    skew: float = 0.8
    skew_spread: float = 0.0
    locality: float = 0.3
    locality_spread: float = 0.0
    cross_layer: float = 0.0
    topics: int = 1
    topic_weight: float = 0.0
    drift: float = 0.0
    vocab: int = 4096
    token_weight: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if self.layers < 1 or self.experts < 2 or not 1 <= self.top_k <= self.experts:
            raise ValueError("synth: need layers >= 1, experts >= 2 and 1 <= top_k <= experts")
        if self.requests < 1 or self.prompt_len < 1 or self.decode_len < 0:
            raise ValueError("synth: need requests >= 1, prompt_len >= 1 and decode_len >= 0")
        for name in ("locality", "cross_layer", "topic_weight", "drift", "token_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"synth: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.skew < 0 or self.skew_spread < 0 or self.locality_spread < 0 or self.topics < 1:
            raise ValueError("synth: skew, skew_spread, locality_spread must be >= 0 and topics >= 1")
        if self.vocab < 1:
            raise ValueError(f"synth: vocab must be >= 1, got {self.vocab}")


# Each regime exaggerates one property; "mixed" combines them at moderate strength.
REGIMES: dict[str, SynthConfig] = {
    "uniform": SynthConfig(skew=0.0, locality=0.0),
    "skewed": SynthConfig(skew=1.2, locality=0.0),
    "sticky": SynthConfig(skew=0.3, locality=0.7),
    "drifting": SynthConfig(skew=1.2, locality=0.2, drift=0.05),
    "topics": SynthConfig(skew=1.0, locality=0.3, topics=8, topic_weight=0.8),
    "layered": SynthConfig(skew=1.0, skew_spread=0.8, locality=0.4, locality_spread=1.0),
    "crosslayer": SynthConfig(skew=0.6, locality=0.2, cross_layer=0.6),
    "prefill": SynthConfig(skew=0.8, locality=0.3, prompt_len=256, decode_len=16),
    "tokens": SynthConfig(skew=0.8, locality=0.3, token_weight=0.6),
    "mixed": SynthConfig(skew=0.9, skew_spread=0.3, locality=0.35, locality_spread=0.5, cross_layer=0.4,
                         topics=6, topic_weight=0.5, drift=0.005),
}


def regime(name: str, **overrides) -> SynthConfig:
    if name not in REGIMES:
        raise ValueError(f"unknown regime {name!r}; known regimes: {', '.join(REGIMES)}")
    return replace(REGIMES[name], **overrides)


def _spread(base: float, spread: float, layers: int) -> np.ndarray:
    offsets = np.linspace(-spread, spread, layers) if layers > 1 else np.zeros(1)
    return base * (1.0 + offsets)


def synth_trace(config: SynthConfig, scores: bool = False) -> Trace:
    """Generate a trace; the same config (seed included) always gives the same arrays.

    ``scores``: also the router scores ``[N, L, E]`` (see the module docstring).
    """
    config.validate()
    rng = np.random.default_rng(config.seed)
    L, E, K = config.layers, config.experts, config.top_k
    ranks = np.arange(1, E + 1, dtype=np.float64)
    skews = np.maximum(_spread(config.skew, config.skew_spread, L), 0.0)
    localities = np.clip(_spread(config.locality, config.locality_spread, L), 0.0, 1.0)
    # Popularity: a Zipf profile over ranks, assigned to experts by a random permutation per layer.
    base = np.empty((L, E))
    for layer in range(L):
        w = ranks ** -skews[layer]
        base[layer, rng.permutation(E)] = w / w.sum()
    topic_pop = np.empty((config.topics, L, E))
    for t in range(config.topics):
        for layer in range(L):
            topic_pop[t, layer] = base[layer, rng.permutation(E)]
    successor = np.stack([rng.permutation(E) for _ in range(L)])  # layer l-1 expert -> layer l expert
    hot = max(2 * K, 1)
    tw = config.topic_weight
    # Token ids and their popularity come from a generator of their own: with token_weight 0 the
    # routing is the same as without ids.
    tok_rng = np.random.default_rng([config.seed, 2])
    V, aw = config.vocab, config.token_weight
    vocab_p = 1.0 / np.arange(1, V + 1)
    token_of_rank = tok_rng.permutation(V)
    token_pop = None
    if aw:
        token_pop = np.empty((V, L, E))
        w = ranks ** -TOKEN_SKEW
        for layer in range(L):
            token_pop[:, layer] = (w / w.sum())[np.argsort(tok_rng.random((V, E)), axis=1)]

    lengths = []
    for _ in range(config.requests):
        p = int(rng.integers(max(1, math.ceil(config.prompt_len * 0.5)), int(config.prompt_len * 1.5) + 1))
        d = int(rng.integers(int(config.decode_len * 0.5), int(config.decode_len * 1.5) + 1)) \
            if config.decode_len else 0
        lengths.append((p, d))
    n = sum(p + d for p, d in lengths)
    tokens = token_of_rank[tok_rng.choice(V, size=n, p=vocab_p / vocab_p.sum())].astype(np.int32)
    experts = np.empty((n, L, K), dtype=np.int16)
    request = np.empty(n, np.int32)
    position = np.empty(n, np.int32)
    phase = np.empty(n, np.int8)
    step = np.empty(n, np.int32)
    row = 0
    step_id = 0
    start_logp = []  # [L, E] per request, for the router scores
    for r, (p, d) in enumerate(lengths):
        topic = int(rng.integers(config.topics))
        logp = np.log((1.0 - tw) * base + tw * topic_pop[topic] + 1e-300)  # [L, E]
        start_logp.append(logp.copy())
        prev: list[list[int]] = [[] for _ in range(L)]
        for pos in range(p + d):
            cur: list[list[int]] = []
            row_logp = logp if token_pop is None else \
                np.log((1.0 - aw) * np.exp(logp) + aw * token_pop[tokens[row]] + 1e-300)
            for layer in range(L):
                if config.drift and rng.random() < config.drift:
                    a = int(np.argsort(-base[layer])[int(rng.integers(hot))])
                    b = int(rng.integers(E))
                    base[layer, [a, b]] = base[layer, [b, a]]
                    logp[layer, [a, b]] = np.log((1.0 - tw) * base[layer, [a, b]]
                                                 + tw * topic_pop[topic, layer, [a, b]] + 1e-300)
                    if token_pop is not None:
                        row_logp[layer] = np.log((1.0 - aw) * np.exp(logp[layer])
                                                 + aw * token_pop[tokens[row], layer] + 1e-300)
                chosen: list[int] = []
                if prev[layer]:
                    keep = rng.random(len(prev[layer])) < localities[layer]
                    chosen = [e for e, k in zip(prev[layer], keep) if k]
                if layer and config.cross_layer:
                    follow = rng.random(K) < config.cross_layer
                    for e, f in zip(cur[layer - 1], follow):
                        s = int(successor[layer, e])
                        if f and s not in chosen:
                            chosen.append(s)
                chosen = chosen[:K]
                if len(chosen) < K:
                    score = row_logp[layer] + rng.gumbel(size=E)
                    if chosen:
                        score[chosen] = -np.inf
                    need = K - len(chosen)
                    top = np.argpartition(-score, need - 1)[:need]
                    chosen.extend(int(e) for e in top[np.argsort(-score[top])])
                cur.append(chosen)
            experts[row] = cur
            request[row], position[row] = r, pos
            phase[row] = 0 if pos < p else 1
            step[row] = step_id
            if pos >= p - 1:
                step_id += 1  # the prompt is one step; every decode token is its own
            prev = cur
            row += 1
    weights = rng.dirichlet(np.ones(K), size=(n, L))
    weights = -np.sort(-weights, axis=-1)
    meta = {"experts": E, "top_k": K, "model": "synthetic", "architecture": "synthetic",
            "moe_layers": list(range(L)), "synth": asdict(config)}
    return Trace(experts=experts, weights=weights.astype(np.float16), request=request, position=position,
                 phase=phase, meta=meta, step=step, tokens=tokens,
                 scores=_router_scores(experts, np.stack(start_logp)[request], config.seed) if scores else None)


def _router_scores(experts: np.ndarray, logp: np.ndarray, seed: int) -> np.ndarray:
    """Softmax scores ``[N, L, E]`` whose top ``K`` are ``experts [N, L, K]`` in order (module docstring)."""
    K = experts.shape[-1]
    z = logp + np.random.default_rng([seed, 1]).gumbel(size=logp.shape)  # [N, L, E]
    values = -np.sort(-z, axis=-1)  # [N, L, E] descending
    rank_key = z.copy()
    lift = values[..., :1] + 1.0 + (K - np.arange(K))  # [N, L, K]: routed experts first, in router order
    np.put_along_axis(rank_key, experts.astype(np.int64), lift, axis=-1)
    order = np.argsort(-rank_key, axis=-1, kind="stable")  # [N, L, E]: experts by rank
    logits = np.empty_like(z)
    np.put_along_axis(logits, order, values, axis=-1)
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    return (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32)


def config_fields() -> list[tuple[str, type]]:
    """(name, type) of every knob, for the command line."""
    return [(f.name, int if f.type in (int, "int") else float) for f in fields(SynthConfig)]
