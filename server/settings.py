"""Server settings: one frozen dataclass built once from the command line (or by tests)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None
    served_model_name: str | None = None  # None: the engine's model name
    max_num_seqs: int = 16  # sequences in the running batch
    max_queued: int = 64  # sequences waiting for a batch slot before requests get 429
    max_model_len: int | None = None  # None: the engine's
    drain_timeout_s: float = 60.0  # SIGTERM: how long running requests may take to finish
    chat_template: str | None = None  # template text (--chat-template FILE); None: the tokenizer's
    kv_cache_bytes: int | None = None  # KV budget checked at admission; None: sized from free memory
    host: str = "127.0.0.1"  # the bind address: admin routes are refused off loopback without a key

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_queued < 0:
            raise ValueError(f"--max-queued must be >= 0, got {self.max_queued}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"--kv-cache-gb must be positive, got {self.kv_cache_bytes / 1e9}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be >= 2, got {self.max_model_len}")
