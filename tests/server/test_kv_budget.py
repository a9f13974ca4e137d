"""The KV budget: each sequence reserves its worst case (prompt + max tokens) before it joins
the batch; a burst over the budget waits or gets 429, and one that could never fit gets 400."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
from serving_helpers import live_server, make_app

from engine.kv_rows import held_positions
from server.budget import default_kv_budget, kv_bytes_per_token


class PeakEngine:
    """The engine, recording the most sequences ever running and the most KV bytes ever held."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.peak_rows = 0
        self.peak_bytes = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def batch_generator(self, max_batch_size: int, max_model_len: int | None):
        gen = self._engine.batch_generator(max_batch_size, max_model_len)
        step = gen.step

        def watched_step():
            events = step()
            self.peak_rows = max(self.peak_rows, gen.num_running)
            self.peak_bytes = max(self.peak_bytes, gen.kv_bytes())
            return events

        gen.step = watched_step
        return gen


def test_bytes_per_token_is_measured(engine):
    per_token = kv_bytes_per_token(engine)
    config = engine.model.config
    # 2 (keys, values) x layers x kv heads x head dim x 4 bytes (float32)
    assert per_token == 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    # each sequence with the positions its KV layers may have allocated beyond the 100 it uses
    assert default_kv_budget(per_token, 4, 100, free_bytes=10**12) == 4 * held_positions(100) * per_token
    assert held_positions(100) == 132
    assert default_kv_budget(per_token, 4, 100, free_bytes=int(per_token * 300 / 0.45)) <= 300 * per_token


def test_burst_over_the_budget_waits_and_never_exceeds_it(engine):
    per_token = kv_bytes_per_token(engine)
    peak = PeakEngine(engine)
    budget = 2 * 60 * per_token  # 60-token sequences reserve held_positions(60) = 92 positions: one at a time
    app = make_app(peak, kv_cache_bytes=budget, max_num_seqs=8, max_queued=3)
    body = {"prompt": "0123456789", "max_tokens": 50, "temperature": 0, "ignore_eos": True}
    with live_server(app) as base:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: httpx.post(base + "/v1/completions", json=body, timeout=60).status_code,
                                     range(8)))
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 2, statuses
        assert 1 <= peak.peak_rows <= 2
        assert peak.peak_bytes <= budget
        too_big = httpx.post(base + "/v1/completions", json={**body, "max_tokens": 100})
        assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "max_tokens"
        assert "KV" in too_big.json()["error"]["message"]
        metrics = httpx.get(base + "/metrics").text
        assert float(re.search(r"^moepager_kv_cache_budget_bytes (\S+)$", metrics, re.MULTILINE).group(1)) == budget
        assert re.search(r"^moepager_kv_cache_used_bytes ", metrics, re.MULTILINE)
