"""Predictor interface and registry.

Design: a predictor only guesses. The engine tells it what each MoE layer routed
to (and the hidden state that produced the routing); it answers with scored
guesses for later layers. Turning guesses into copies (budget, priority,
cancellation) is the planner's job, so every predictor is judged under the same
planner, live and in the simulator.

Call order, per forward (one token step of a batch, or a prefill chunk):
``reset()``, then for each MoE layer ``observe(layer, ...)`` followed by
``predict(layer)``. ``begin_request()`` is called before the first forward of a
new request (batch-1 serving, the simulator); predictors that keep per-request
state (previous token, activation matrix) clear it there.

Scores: ``probability that some token of this step uses the expert / d``, where
``d = target_layer - layer`` is the lookahead distance, so a confident guess for
the next layer outranks the same guess three layers out and scores from
different predictors mean the same thing to the planner. Each predictor returns
at most ``top_k * T`` experts per target layer (T = tokens in the step).

Every factory takes the same keyword arguments and ignores the ones it does not
need: ``num_layers``, ``num_experts``, ``top_k``, ``lookahead`` (D), ``routers``
(one callable ``hidden [T, H] -> top_k_index [T, K]`` per MoE layer; live only),
``path`` (a trained predictor file) and ``trace`` (the oracle's future).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from cache.base import ExpertKey
from cache.registry import Registry


@runtime_checkable
class Predictor(Protocol):
    name: str

    def observe(self, layer: int, hidden: torch.Tensor | None, top_k_index: torch.Tensor) -> None: ...  # [T, H], [T, K]
    def predict(self, layer: int) -> list[tuple[ExpertKey, float]]: ...  # later layers, scored
    def reset(self) -> None: ...  # a new forward (token step) begins
    def begin_request(self) -> None: ...  # the next forward starts a new request


PredictorFactory = Callable[..., Predictor]
PREDICTORS = Registry("predictor", "predictors")
_REGISTRY = PREDICTORS.factories


def register_predictor(name: str, *, offline_only: bool = False) -> Callable[[PredictorFactory], PredictorFactory]:
    return PREDICTORS.register(name, offline_only=offline_only)


def predictor_names(*, online_only: bool = False) -> list[str]:
    return PREDICTORS.names(online_only=online_only)


def is_offline_only(name: str) -> bool:
    return PREDICTORS.is_offline_only(name)


def build_predictor(name: str, **kwargs) -> Predictor:
    return PREDICTORS.build(name, **kwargs)


@register_predictor("none")
class NoPrediction:
    """Demand paging only."""

    def __init__(self, **kwargs) -> None:
        pass

    def observe(self, layer: int, hidden: torch.Tensor | None, top_k_index: torch.Tensor) -> None:
        return None

    def predict(self, layer: int) -> list[tuple[ExpertKey, float]]:
        return []

    def reset(self) -> None:
        return None

    def begin_request(self) -> None:
        return None


def target_layers(layer: int, lookahead: int, num_layers: int) -> range:
    """The layers a prediction made at ``layer`` covers: ``layer+1 .. layer+D``, clipped."""
    return range(layer + 1, min(layer + lookahead, num_layers - 1) + 1)


def scored_top(target: int, distance: int, probs, width: int) -> list[tuple[ExpertKey, float]]:
    """The ``width`` most likely experts of layer ``target`` as ``(key, prob / distance)``.

    ``probs`` is a 1-D array-like of per-expert probabilities; zero-probability
    experts are never returned.
    """
    probs = np.asarray(probs, dtype=np.float64)
    width = min(int(width), probs.shape[0])
    if width <= 0:
        return []
    top = np.argpartition(-probs, width - 1)[:width] if width < probs.shape[0] else np.arange(probs.shape[0])
    top = top[np.argsort(-probs[top], kind="stable")]
    scores = probs[top]
    keep = scores > 0
    return [(ExpertKey(target, e), p / distance) for e, p in zip(top[keep].tolist(), scores[keep].tolist())]


def index_array(top_k_index) -> np.ndarray:
    """``top_k_index`` (tensor on any device, or array) as a host int64 array [T, K]."""
    if isinstance(top_k_index, torch.Tensor):
        top_k_index = top_k_index.detach().to("cpu", torch.int64).numpy()
    out = np.asarray(top_k_index, dtype=np.int64)
    return out.reshape(1, -1) if out.ndim == 1 else out
