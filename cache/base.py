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

from cache.registry import Registry


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


def lowest_ranked(resident: Collection[ExpertKey], protected: AbstractSet[ExpertKey],
                  rank: Callable[[ExpertKey], tuple]) -> ExpertKey:
    """The unprotected resident key with the smallest ``rank`` (first found wins a tie).

    Every scoring policy's ``victim`` is this scan with its own rank.
    """
    best = None
    best_rank = None
    for key in resident:
        if key in protected:
            continue
        r = rank(key)
        if best_rank is None or r < best_rank:
            best, best_rank = key, r
    if best is None:
        raise RuntimeError("no evictable expert: every resident expert is protected")
    return best


PolicyFactory = Callable[..., EvictionPolicy]
POLICIES = Registry("cache policy", "policies")
_REGISTRY = POLICIES.factories


def register_policy(name: str, *, offline_only: bool = False,
                    shape_args: tuple[str, ...] = ()) -> Callable[[PolicyFactory], PolicyFactory]:
    """Class decorator: make a policy constructible by name.

    ``offline_only``: it needs the future (``future=``, simulator only); ``shape_args``: the
    ``cache.shape.ModelShape`` fields its constructor takes (e.g. ``("num_layers",)``).
    """
    return POLICIES.register(name, offline_only=offline_only, shape_args=shape_args)


def policy_names(*, online_only: bool = False) -> list[str]:
    return POLICIES.names(online_only=online_only)


def is_offline_only(name: str) -> bool:
    return POLICIES.is_offline_only(name)


def build_policy(name: str, **kwargs) -> EvictionPolicy:
    """Construct a registered policy; unknown names raise ValueError listing the known ones."""
    return POLICIES.build(name, **kwargs)
