"""The offloaded engine: load a Hugging Face MoE folder, page its experts, generate."""

from engine.config import EngineConfig
from engine.errors import BudgetError, ModelLoadError, MoepagerError


def __getattr__(name: str):
    # Engine pulls in transformers; import it lazily so `import engine.config` stays light.
    if name == "Engine":
        from engine.engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["BudgetError", "Engine", "EngineConfig", "ModelLoadError", "MoepagerError"]
