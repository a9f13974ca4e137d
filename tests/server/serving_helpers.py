"""Helpers for the server tests: a tiny random MoE model with a printable-ASCII tokenizer, app
construction, and a live uvicorn server on a free port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
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


def make_app(engine, **settings):
    return create_app(engine, ServerSettings(**settings))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app, timeout_s: float = 90.0) -> Iterator[str]:
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




class SlowEngine:
    """The engine with every ``step()`` slowed down, so a test can hold batch slots for a while."""

    def __init__(self, engine, step_delay_s: float = 0.05) -> None:
        self._engine = engine
        self._delay = step_delay_s

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def batch_generator(self, max_batch_size: int, max_model_len: int | None):
        gen = self._engine.batch_generator(max_batch_size, max_model_len)
        step = gen.step

        def slow_step():
            time.sleep(self._delay)
            return step()

        gen.step = slow_step
        return gen
