"""Predictors of the next layers' experts and the planner that turns guesses into copies.

Predictors (by name): ``none``; ``prev`` (the previous token's experts);
``freq`` (each layer's most used experts so far); ``pregate`` (the next layers'
routers applied to the current hidden state; live only); ``eam`` (MoE-Infinity
activation-matrix matching); ``learned`` (a model trained with
``moepager predictor train``); ``oracle`` (the trace's future; simulator only).
Training and evaluation on routing arrays live in :mod:`prefetch.training`.
"""

# Importing the predictor modules registers them.
from prefetch import eam as _eam  # noqa: F401
from prefetch import freq as _freq  # noqa: F401
from prefetch import learned as _learned  # noqa: F401
from prefetch import oracle as _oracle  # noqa: F401
from prefetch import pregate as _pregate  # noqa: F401
from prefetch import prev as _prev  # noqa: F401
from prefetch.base import Predictor, build_predictor, predictor_names, register_predictor

__all__ = ["Predictor", "build_predictor", "predictor_names", "register_predictor"]
