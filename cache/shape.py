"""The model's shape as the cache and the predictors see it, and building them from it.

Design: the engine (from the loaded model) and the simulator (from a trace's
header) each make one frozen :class:`ModelShape`; policies and predictors are
built from it through their public registries (predictors: ``prefetch.base.build_predictor(name, **shape.predictor_kwargs(D), ...)``), each taking the fields it
declared at registration. No constructor is inspected, no name is compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cache.base import POLICIES, EvictionPolicy


@dataclass(frozen=True)
class ModelShape:
    num_layers: int  # MoE layers
    num_experts: int  # routed experts per layer
    top_k: int
    page_bytes: int = 1  # bytes of one expert's page (1 when only counts matter)

    def predictor_kwargs(self, lookahead: int) -> dict[str, int]:
        """The shape keywords every predictor factory takes (``prefetch.base.build_predictor``)."""
        return {"num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
                "lookahead": lookahead}


def build_policy_for(name: str, shape: ModelShape, future: Any = None, **kwargs) -> EvictionPolicy:
    """A registered policy for ``shape``; ``future`` (the ``(step, key)`` accesses to come) only
    reaches offline-only policies, which need it."""
    if POLICIES.is_offline_only(name):
        if future is None:
            raise ValueError(f"cache policy {name!r} needs the future and runs only in the simulator")
        kwargs.setdefault("future", future)
    return POLICIES.build_for(name, shape, **kwargs)
