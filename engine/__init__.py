"""The offloaded engine: load a Hugging Face MoE folder, page its experts, generate."""

import os as _os

# libgomp (torch's OpenMP on Linux) lets idle worker threads spin about 300,000 times before they
# sleep. When another process, or a server's own event loop, holds one of the cores, every parallel
# region then waits a whole scheduler slice for its preempted member: CPU decode measured 12x slower
# on 2 cores beside one busy background process. A short spin, then sleep, lets the kernel's wakeup
# preemption run the member at once. Effective only when set before torch is first imported (the
# `moepager` command does so); an explicit setting wins.
OMP_SPIN_DEFAULT = "1000"
_os.environ.setdefault("GOMP_SPINCOUNT", OMP_SPIN_DEFAULT)

from engine.config import EngineConfig
from engine.errors import BudgetError, ModelLoadError, MoepagerError


def __getattr__(name: str):
    # Engine pulls in transformers; import it lazily so `import engine.config` stays light.
    if name == "Engine":
        from engine.engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["BudgetError", "Engine", "EngineConfig", "ModelLoadError", "MoepagerError"]
