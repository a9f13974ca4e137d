"""Server test fixtures: the tiny MoE model, the engine built from it, a live server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_helpers import build_tiny_moe, live_server, make_app


@pytest.fixture(scope="session")
def server_model_dir(tmp_path_factory) -> Path:
    return build_tiny_moe(tmp_path_factory.mktemp("tiny-moe"))


@pytest.fixture(scope="session")
def engine(server_model_dir):
    from engine.config import EngineConfig
    from engine.engine import Engine

    return Engine.from_config(EngineConfig(model=str(server_model_dir), device="cpu", expert_slots=4,
                                           progress=False))


@pytest.fixture(scope="module")
def server_url(engine) -> Iterator[str]:
    with live_server(make_app(engine)) as base:
        yield base
