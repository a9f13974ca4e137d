"""Predictor interface and registry.

Design: a predictor only guesses. The engine tells it what each MoE layer routed
to (and the hidden state that produced the routing); it answers with scored
guesses for later layers. Turning guesses into copies (budget, priority,
cancellation) is the planner's job, so every predictor is judged under the same
planner, live and in the simulator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from cache.base import ExpertKey


@runtime_checkable
class Predictor(Protocol):
    name: str

    def observe(self, layer: int, hidden: torch.Tensor | None, top_k_index: torch.Tensor) -> None: ...  # [T, H], [T, K]
    def predict(self, layer: int) -> list[tuple[ExpertKey, float]]: ...  # later layers, scored
    def reset(self) -> None: ...  # a new forward (token step) begins


PredictorFactory = Callable[..., Predictor]
_REGISTRY: dict[str, PredictorFactory] = {}
_OFFLINE_ONLY: set[str] = set()


def register_predictor(name: str, *, offline_only: bool = False) -> Callable[[PredictorFactory], PredictorFactory]:
    def wrap(factory: PredictorFactory) -> PredictorFactory:
        if name in _REGISTRY:
            raise ValueError(f"predictor {name!r} is already registered")
        _REGISTRY[name] = factory
        if offline_only:
            _OFFLINE_ONLY.add(name)
        factory.name = name  # type: ignore[attr-defined]
        return factory

    return wrap


def predictor_names(*, online_only: bool = False) -> list[str]:
    return sorted(n for n in _REGISTRY if not (online_only and n in _OFFLINE_ONLY))


def is_offline_only(name: str) -> bool:
    return name in _OFFLINE_ONLY


def build_predictor(name: str, **kwargs) -> Predictor:
    if name not in _REGISTRY:
        raise ValueError(f"unknown predictor {name!r}; known predictors: {', '.join(predictor_names())}")
    return _REGISTRY[name](**kwargs)


@register_predictor("none")
class NoPrediction:
    """Demand paging only."""

    def observe(self, layer: int, hidden: torch.Tensor | None, top_k_index: torch.Tensor) -> None:
        return None

    def predict(self, layer: int) -> list[tuple[ExpertKey, float]]:
        return []

    def reset(self) -> None:
        return None
