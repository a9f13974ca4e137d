"""Server test fixtures: the tiny MoE model, the engine built from it, a live server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from serving_helpers import MAX_MODEL_LEN, build_tiny_moe, live_server, make_app


@pytest.fixture(scope="session")
def server_model_dir(tmp_path_factory) -> Path:
    return build_tiny_moe(tmp_path_factory.mktemp("tiny-moe"))


class _PlainEngine:
    """Stand-in with the Engine API over a plain transformers model, until engine.Engine lands."""

    def __init__(self, path: Path) -> None:
        from types import SimpleNamespace

        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.device = torch.device("cpu")
        self.config = None
        self.model_name = path.name
        self.max_model_len = MAX_MODEL_LEN
        self.cache_policy = "lru"
        layers = self.model.config.num_hidden_layers
        self.counters = SimpleNamespace(
            queries=[[0] * layers, [0] * layers], hits=[[0] * layers, [0] * layers], demand_bytes=0,
            prefetch_bytes=0, stall_seconds=[0.0, 0.0], prefetch_issued=0, prefetch_useful=0,
            prefetch_wasted=0, prefetch_late=0, cpu_computed=0, capacity_bytes=0, used_bytes=0)

    def batch_generator(self, max_batch_size: int, max_model_len: int | None):
        from engine.generation import BatchGenerator

        return BatchGenerator(self.model, self.tokenizer, self.device, max_batch_size=max_batch_size,
                              max_model_len=max_model_len)

    def set_cache_policy(self, name: str) -> None:
        from cache.base import policy_names

        if name not in policy_names(online_only=True):
            raise ValueError(f"unknown cache policy {name!r}")
        self.cache_policy = name

    def expert_stats(self) -> dict:
        return {"layers": [], "resident": []}

    def stats(self) -> dict:
        return {}


@pytest.fixture(scope="session")
def engine(server_model_dir):
    from engine.config import EngineConfig

    torch.set_num_threads(1)
    try:
        from engine.engine import Engine
    except ImportError:
        return _PlainEngine(server_model_dir)
    return Engine.from_config(EngineConfig(model=str(server_model_dir), device="cpu", expert_slots=4,
                                           progress=False))


@pytest.fixture(scope="module")
def server_url(engine) -> Iterator[str]:
    with live_server(make_app(engine)) as base:
        yield base
