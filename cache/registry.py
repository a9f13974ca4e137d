"""A registry of named factories (cache policies, predictors): the CLI's choices come from it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry:
    """Name -> factory, failing loudly on duplicates and listing the known names on a miss."""

    def __init__(self, kind: str, plural: str) -> None:
        self.kind = kind  # e.g. "cache policy"
        self.plural = plural  # e.g. "policies"
        self.factories: dict[str, Callable[..., Any]] = {}
        # Factories that need the future (Belady, the oracle) run only in the simulator.
        self.offline: set[str] = set()
        # Model-shape fields (``num_layers``, ``num_experts``, ...) each factory takes, declared at registration.
        self.shape_args: dict[str, tuple[str, ...]] = {}

    def register(self, name: str, *, offline_only: bool = False,
                 shape_args: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
        def wrap(factory: Callable) -> Callable:
            if name in self.factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self.factories[name] = factory
            self.shape_args[name] = tuple(shape_args)
            if offline_only:
                self.offline.add(name)
            factory.name = name  # type: ignore[attr-defined]
            return factory

        return wrap

    def names(self, *, online_only: bool = False) -> list[str]:
        return sorted(n for n in self.factories if not (online_only and n in self.offline))

    def is_offline_only(self, name: str) -> bool:
        return name in self.offline

    def build(self, name: str, **kwargs) -> Any:
        if name not in self.factories:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(self.names())}")
        return self.factories[name](**kwargs)

    def build_for(self, name: str, shape: Any, **kwargs) -> Any:
        """Build ``name`` giving it the fields of ``shape`` it declared at registration, plus ``kwargs``."""
        self.build_check(name)
        args = {field: getattr(shape, field) for field in self.shape_args[name]}
        args.update(kwargs)
        return self.factories[name](**args)

    def build_check(self, name: str) -> None:
        if name not in self.factories:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(self.names())}")
