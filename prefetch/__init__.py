"""Predictors of the next layers' experts and the planner that turns guesses into copies."""

# Importing the predictor modules registers them.
from prefetch import eam as _eam  # noqa: F401
from prefetch import freq as _freq  # noqa: F401
from prefetch import learned as _learned  # noqa: F401
from prefetch import oracle as _oracle  # noqa: F401
from prefetch import pregate as _pregate  # noqa: F401
from prefetch import prev as _prev  # noqa: F401
from prefetch.base import Predictor, build_predictor, predictor_names, register_predictor

__all__ = ["Predictor", "build_predictor", "predictor_names", "register_predictor"]
