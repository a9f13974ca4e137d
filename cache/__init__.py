"""Expert-cache bookkeeping: eviction policies (by name) and the cache state machine.

Nothing here touches tensors or devices: the engine's slot pool and the offline
simulator drive the very same objects, so a policy measured offline behaves the
same live.
"""

# Importing the policy modules registers them.
from cache import adaptive as _adaptive  # noqa: F401
from cache import belady as _belady  # noqa: F401
from cache import eam as _eam  # noqa: F401
from cache import lfru as _lfru  # noqa: F401
from cache import lfu as _lfu  # noqa: F401
from cache import lru as _lru  # noqa: F401
from cache import nextuse as _nextuse  # noqa: F401
from cache.base import EvictionPolicy, ExpertKey, build_policy, policy_names, register_policy
from cache.capacity import split_capacity
from cache.manager import ExpertCache, StepResult

__all__ = [
    "EvictionPolicy",
    "ExpertCache",
    "ExpertKey",
    "StepResult",
    "build_policy",
    "policy_names",
    "register_policy",
    "split_capacity",
]
