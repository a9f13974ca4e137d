"""Expert-cache bookkeeping: eviction policies (by name) and the cache state machine.

Nothing here touches tensors or devices: the engine's slot pool and the offline
simulator drive the very same objects, so a policy measured offline behaves the
same live.
"""

from cache.base import EvictionPolicy, ExpertKey, build_policy, policy_names, register_policy
from cache.manager import ExpertCache, StepResult

# Importing the policy modules registers them.
from cache import lru as _lru  # noqa: F401,E402

__all__ = [
    "EvictionPolicy",
    "ExpertCache",
    "ExpertKey",
    "StepResult",
    "build_policy",
    "policy_names",
    "register_policy",
]
