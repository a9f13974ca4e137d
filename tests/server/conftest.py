"""Server test fixtures: a tiny random MoE model with a printable-ASCII tokenizer, the engine
built from it, apps over that engine, and a live uvicorn server on a free port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from server.app import create_app
from server.settings import ServerSettings

MAX_MODEL_LEN = 128


def _byte_char(b: int) -> str:
    # GPT-2 byte-level alphabet: printable bytes map to themselves, the rest shift past 255.
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if b in printable:
        return chr(b)
    return chr(256 + [x for x in range(256) if x not in printable].index(b))


def build_tokenizer(out_dir: Path):
    """Byte-level BPE with no merges over printable ASCII: every output decodes to clean text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    chars = [_byte_char(b) for b in [10, *range(32, 127)]]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", model_max_length=MAX_MODEL_LEN,
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_moe(out_dir: Path) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = build_tokenizer(out_dir)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                            moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                            decoder_sparse_step=1, max_position_embeddings=MAX_MODEL_LEN,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # sharper logits: fewer near-ties, so greedy output is robust to batching
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
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
def engine(tiny_model_dir):
    from engine.config import EngineConfig

    torch.set_num_threads(1)
    try:
        from engine.engine import Engine
    except ImportError:
        return _PlainEngine(tiny_model_dir)
    return Engine.from_config(EngineConfig(model=str(tiny_model_dir), device="cpu", expert_slots=4,
                                           progress=False))


def make_app(engine, **settings):
    return create_app(engine, ServerSettings(**settings))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app, timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free port in a thread; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + "/health", timeout=1.0).status_code == 200:
                break
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError("server did not become healthy")
        time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server_url(engine) -> Iterator[str]:
    with live_server(make_app(engine)) as base:
        yield base
