"""A live uvicorn server on a real socket, driven by the official ``openai`` client and httpx:
concurrency, disconnects, back-pressure."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serving_helpers import SlowEngine, live_server, make_app


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def model_id(client) -> str:
    return client.models.list().data[0].id


def gauge(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics").text
    match = re.search(rf"^moepager_{name} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_openai_chat(client):
    r = client.chat.completions.create(model=model_id(client), messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    assert isinstance(r.choices[0].message.content, str)


def test_openai_chat_stream_with_usage(client):
    name = model_id(client)
    messages = [{"role": "user", "content": "tell me"}]
    stream = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    plain = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert text == plain.choices[0].message.content


def test_openai_completions_and_errors(client):
    name = model_id(client)
    r = client.completions.create(model=name, prompt="abc", max_tokens=3, temperature=0)
    assert r.object == "text_completion" and r.usage.prompt_tokens > 0
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="abc", max_tokens=3)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=name, prompt="abc", max_tokens=10**9)
    assert "maximum context length" in str(info.value)


def test_wrong_key_is_401(engine):
    with live_server(make_app(engine, api_key="right")) as base:
        wrong = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=base + "/v1", api_key="right", max_retries=0)
        assert right.models.list().data


def test_sixteen_concurrent_streams_match_sequential(client, server_url):
    name = model_id(client)
    prompts = [f"prompt number {i} " + "xyz"[: i % 4] for i in range(16)]

    def one_stream(prompt: str) -> str:
        stream = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in stream if c.choices)

    sequential = [one_stream(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(one_stream, prompts))
    assert concurrent == sequential
    assert gauge(server_url, "num_requests_running") == 0


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_sequence(engine, stream):
    # A slowed engine (50 ms per step) so the client surely leaves mid-generation.
    app = make_app(SlowEngine(engine))
    body = {"prompt": "long story", "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": stream}
    with live_server(app) as base, httpx.Client(timeout=30) as http:
        if stream:
            with http.stream("POST", base + "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                assert gauge(base, "num_requests_running") == 1
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post(base + "/v1/completions", json=body, timeout=0.3)
        deadline = time.monotonic() + 10
        while gauge(base, "num_requests_running") + gauge(base, "num_requests_waiting") > 0:
            assert time.monotonic() < deadline, "sequence still running after the client left"
            time.sleep(0.05)
        text = http.get(base + "/metrics").text
        assert float(re.search(r'request_success_total\{finished_reason="abort"\} (\S+)', text).group(1)) >= 1


def test_full_queue_is_429_and_server_survives(engine):
    app = make_app(SlowEngine(engine), max_num_seqs=1, max_queued=0)
    with live_server(app) as base, httpx.Client(timeout=30) as http:
        long = {"prompt": "hold the slot", "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True}
        with http.stream("POST", base + "/v1/completions", json=long) as r:
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the connection
            assert next(lines).startswith("data: ")
            busy = http.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1
            assert busy.json()["error"]["type"] == "rate_limit_error"
            too_many = http.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 2})
            assert too_many.status_code == 400  # can never fit: a 400, not a retry
        deadline = time.monotonic() + 10
        while True:
            ok = http.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
            if ok.status_code == 200:
                break
            assert ok.status_code == 429 and time.monotonic() < deadline
            time.sleep(0.05)
        assert http.get(base + "/health").status_code == 200
        assert 'requests_rejected_total{reason="queue_full"} 1.0' in http.get(base + "/metrics").text


def test_drain_lets_running_requests_finish(engine):
    from server.app import begin_drain

    app = make_app(SlowEngine(engine))  # slowed, so the request is surely still running at the drain
    with live_server(app) as base, httpx.Client(timeout=30) as http:
        result = {}

        def run() -> None:
            body = {"prompt": "finish me", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
            result["r"] = http.post(base + "/v1/completions", json=body)

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 10
        while gauge(base, "num_requests_running") == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
        begin_drain(app)
        assert http.post(base + "/v1/completions", json={"prompt": "x"}).status_code == 503
        worker.join(30)
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 40
