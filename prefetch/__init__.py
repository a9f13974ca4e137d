"""Predictors of the next layers' experts and the planner that turns guesses into copies."""

from prefetch.base import Predictor, build_predictor, predictor_names, register_predictor

__all__ = ["Predictor", "build_predictor", "predictor_names", "register_predictor"]
