"""The OpenAI API through FastAPI's TestClient: responses, limits and error shapes."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from serving_helpers import MAX_MODEL_LEN, make_app

from server.app import create_app
from server.metrics import OFFLOAD_METRICS, SERVING_METRICS
from server.settings import ServerSettings

CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(make_app(engine)) as c:
        yield c


def sse_events(text: str) -> list[str]:
    """Payloads of an SSE body; asserts the framing (`data: ...` events separated by blank lines)."""
    assert text.endswith("data: [DONE]\n\n")
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    payloads = []
    for block in blocks[:-1]:
        assert block.startswith("data: "), block
        payloads.append(block[len("data: "):])
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return payloads[:-1]


def assert_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_chat_completion(client):
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int) and body["model"]
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_content_parts_and_developer_role(client):
    messages = [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}]
    r = client.post("/v1/chat/completions", json={**CHAT, "messages": messages, "user": None})
    assert r.status_code == 200, r.text


def test_max_completion_tokens_wins(client):
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8, "max_completion_tokens": 3,
                                                  "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 3
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_completion_prompt_forms(client):
    base = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    text = client.post("/v1/completions", json={**base, "prompt": "abc"}).json()
    assert text["object"] == "text_completion" and len(text["choices"]) == 1
    ids = client.post("/v1/completions", json={**base, "prompt": [5, 6, 7]}).json()
    assert ids["usage"]["prompt_tokens"] == 3
    batch = client.post("/v1/completions", json={**base, "prompt": ["abc", "xyz"], "n": 2}).json()
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    assert batch["choices"][0]["text"] == text["choices"][0]["text"]  # greedy: same prompt, same text
    assert batch["usage"]["completion_tokens"] == 16


def test_n_choices_with_seed_differ_and_reproduce(client):
    body = {"prompt": "abc", "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 3, "ignore_eos": True}
    first = [c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]]
    again = [c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]]
    assert first == again
    assert len(set(first)) > 1


def test_stop_string_truncates(client):
    base = {"prompt": "the cat", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    full = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    stop = full[6:8]
    expected = full[:full.index(stop)]
    r = client.post("/v1/completions", json={**base, "stop": [stop, "\x00never"]}).json()["choices"][0]
    assert r["text"] == expected and r["finish_reason"] == "stop"
    streamed = client.post("/v1/completions", json={**base, "stop": stop, "stream": True})
    chunks = [json.loads(p) for p in sse_events(streamed.text)]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_streaming_framing_and_usage(client):
    r = client.post("/v1/chat/completions",
                    json={**CHAT, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = [json.loads(p) for p in sse_events(r.text)]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "length"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])
    plain = client.post("/v1/chat/completions", json={**CHAT, "ignore_eos": True}).json()
    assert content == plain["choices"][0]["message"]["content"]


def test_streaming_without_usage_has_no_usage_chunk(client):
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    chunks = [json.loads(p) for p in sse_events(r.text)]
    assert all(c["choices"] for c in chunks) and all("usage" not in c for c in chunks)


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, None),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**12}, "max_tokens"),
    ({"max_completion_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 10_000}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
])
def test_bad_chat_requests_are_400(client, body, param):
    assert_error(client.post("/v1/chat/completions", json={**CHAT, **body}), 400, param)


@pytest.mark.parametrize("prompt", ["", [], [999999], [-1], "x" * (MAX_MODEL_LEN * 2)])
def test_bad_prompts_are_400(client, prompt):
    assert_error(client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}), 400, "prompt")


def test_malformed_json_is_400(client):
    r = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert "JSON" in assert_error(r, 400)["message"]
    assert_error(client.post("/v1/completions", json=[1, 2]), 400)
    assert_error(client.post("/v1/completions", json={}), 400, "prompt")


def test_unknown_model_is_404(client):
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404, "model")
    assert error["code"] == "model_not_found"
    name = client.get("/v1/models").json()["data"][0]["id"]
    assert client.post("/v1/chat/completions", json={**CHAT, "model": name}).status_code == 200


def test_models_version_health(client):
    (card,) = client.get("/v1/models").json()["data"]
    assert card["max_model_len"] == MAX_MODEL_LEN and card["cache_policy"] == "adaptive"  # the default
    version = client.get("/version").json()
    assert version["version"] and version["cache_policy"] == "adaptive" and "prefetch" in version
    kernels = version["kernels"]
    assert kernels["moe_ffn"].startswith(("native-", "reference")) and kernels["expert_pages"] and kernels["cpu_isa"]
    assert client.get("/health").status_code == 200


def test_cache_policy_switch(client):
    r = client.post("/v1/admin/cache_policy", json={"policy": "lfu"})
    assert r.status_code == 200 and r.json()["cache_policy"] == "lfu"
    assert client.get("/v1/models").json()["data"][0]["cache_policy"] == "lfu"
    error = assert_error(client.post("/v1/admin/cache_policy", json={"policy": "nope"}), 400, "policy")
    assert "lru" in error["message"]
    assert client.post("/v1/admin/cache_policy", json={"policy": "adaptive"}).status_code == 200


def test_expert_stats_is_json(client):
    r = client.get("/v1/expert_stats")
    assert r.status_code == 200 and isinstance(r.json(), dict)


def test_metrics_expose_every_design_name(client):
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    text = client.get("/metrics").text
    for name in SERVING_METRICS + OFFLOAD_METRICS:
        assert f"\nmoepager_{name}" in text, name
    for line in text.splitlines():
        assert "expert=" not in line and "request_id" not in line
    assert 'moepager_request_success_total{finished_reason="length"}' in text


def test_api_key(engine):
    with TestClient(make_app(engine, api_key="sekret")) as c:
        assert_error(c.post("/v1/chat/completions", json=CHAT), 401)
        assert_error(c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"}), 401)
        assert_error(c.post("/v1/admin/cache_policy", json={"policy": "lru"}), 401)
        ok = c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_health_is_503_until_loaded(engine):
    release = threading.Event()

    def loader():
        release.wait(10)
        return engine

    with TestClient(create_app(loader, ServerSettings())) as c:
        assert c.get("/health").status_code == 503
        assert_error(c.post("/v1/chat/completions", json=CHAT), 503)
        assert c.get("/metrics").status_code == 200
        release.set()
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_draining_refuses_new_requests(engine):
    from server.app import begin_drain

    app = make_app(engine)
    with TestClient(app) as c:
        begin_drain(app)
        assert c.get("/health").status_code == 503
        assert_error(c.post("/v1/completions", json={"prompt": "a"}), 503)


def test_admin_needs_a_key_off_loopback(engine):
    with TestClient(make_app(engine, host="0.0.0.0")) as c:
        error = assert_error(c.post("/v1/admin/cache_policy", json={"policy": "lru"}), 403)
        assert "--api-key" in error["message"]
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200  # the API itself stays open
    with TestClient(make_app(engine, host="0.0.0.0", api_key="k")) as c:
        assert_error(c.post("/v1/admin/cache_policy", json={"policy": "lru"}), 401)
        ok = c.post("/v1/admin/cache_policy", json={"policy": "lru"}, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200
    with TestClient(make_app(engine, host="::1")) as c:
        assert c.post("/v1/admin/cache_policy", json={"policy": "lru"}).status_code == 200
