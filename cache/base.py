"""Policy interface and registry.

Design: a policy is pure bookkeeping. It is told about accesses, inserts and
evictions, and asked for a victim among the resident keys of one scope (a layer,
or the whole model for a global cache). It never moves bytes and never calls
back into the cache, so it can be unit-tested with hand-built sequences and
replayed offline at hundreds of thousands of steps per second.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from collections.abc import Set as AbstractSet
from typing import NamedTuple, Protocol, runtime_checkable


class ExpertKey(NamedTuple):
    layer: int  # index among the model's MoE layers (0-based), not the decoder layer index
    expert: int


@runtime_checkable
class EvictionPolicy(Protocol):
    name: str

    def on_access(self, key: ExpertKey, hit: bool, step: int) -> None: ...
    def on_insert(self, key: ExpertKey) -> None: ...
    def on_evict(self, key: ExpertKey) -> None: ...
    def victim(self, resident: Collection[ExpertKey], protected: AbstractSet[ExpertKey]) -> ExpertKey: ...


PolicyFactory = Callable[..., EvictionPolicy]
_REGISTRY: dict[str, PolicyFactory] = {}
# Policies that need the future (Belady) can only run in the simulator.
_OFFLINE_ONLY: set[str] = set()


def register_policy(name: str, *, offline_only: bool = False) -> Callable[[PolicyFactory], PolicyFactory]:
    """Class decorator: make a policy constructible by name."""

    def wrap(factory: PolicyFactory) -> PolicyFactory:
        if name in _REGISTRY:
            raise ValueError(f"cache policy {name!r} is already registered")
        _REGISTRY[name] = factory
        if offline_only:
            _OFFLINE_ONLY.add(name)
        factory.name = name  # type: ignore[attr-defined]
        return factory

    return wrap


def policy_names(*, online_only: bool = False) -> list[str]:
    return sorted(n for n in _REGISTRY if not (online_only and n in _OFFLINE_ONLY))


def is_offline_only(name: str) -> bool:
    return name in _OFFLINE_ONLY


def build_policy(name: str, **kwargs) -> EvictionPolicy:
    """Construct a registered policy; unknown names raise ValueError listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown cache policy {name!r}; known policies: {', '.join(policy_names())}")
    return _REGISTRY[name](**kwargs)
