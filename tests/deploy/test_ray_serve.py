"""The Ray Serve application on the CPU: 2 replicas of the embedded model, 1 CPU each.

Concurrent chat lands on both replicas; every turn of a conversation (keyed by header or by
prompt prefix) lands on the replica that served its first turn; killing a replica in the
middle of a load loses no request; ``/metrics`` shows both replicas, labelled.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from pathlib import Path

import httpx
import pytest
from manifest_names import KV_METRICS, exported_names, used_names

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]'")

ROOT = Path(__file__).resolve().parents[2]
APP = "moepager"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url():
    from deploy.ray.app import build_app

    # workers import this checkout's packages (deploy, server, engine) first
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}})
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"num_replicas": 2, "replica_cpus": 1, "max_imbalance": 64,
                             "serve_args": ["--device", "cpu", "--max-num-seqs", "8"]}),
                  name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _chat(i: int, turn: int) -> tuple[dict, dict]:
    """Conversation i, turn 0 or 1: even ones send a conversation id, odd ones rely on the prefix hash."""
    messages = [{"role": "system", "content": "You are a storyteller."},
                {"role": "user", "content": f"Tell me about the {i}th little fox."}]
    if turn:
        messages += [{"role": "assistant", "content": "The fox ran."}, {"role": "user", "content": "And then?"}]
    headers = {"X-Conversation-Id": f"conv-{i}"} if i % 2 == 0 else {}
    return headers, {"model": "moepager-default", "messages": messages, "max_tokens": 6, "temperature": 0}


async def _post_all(base_url: str, requests: list[tuple[dict, dict]], timeout: float = 120.0) -> list:
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions", json=body, headers=headers)
                                      for headers, body in requests))


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_routes_health_models_and_streaming(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/v1/models").json()["data"][0]["id"] == "moepager-default"
        body = {"model": "moepager-default", "prompt": "Once upon a time", "max_tokens": 4, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
        bad = client.post("/v1/chat/completions", json={"model": "moepager-default", "messages": []})
        assert bad.status_code == 400 and "error" in bad.json()  # the replica's own validation, passed through


def test_concurrent_chat_uses_both_replicas_and_keeps_conversations(base_url):
    n = 16
    first = asyncio.run(_post_all(base_url, [_chat(i, 0) for i in range(n)]))
    assert [r.status_code for r in first] == [200] * n, [r.text[:200] for r in first]
    home = [r.headers["x-moepager-replica"] for r in first]
    assert len(set(home)) == 2, home  # concurrent load spreads over both replicas
    second = asyncio.run(_post_all(base_url, [_chat(i, 1) for i in range(n)]))
    assert [r.status_code for r in second] == [200] * n
    assert [r.headers["x-moepager-replica"] for r in second] == home  # every conversation stayed home
    assert all(r.json()["choices"][0]["message"]["content"] is not None for r in second)

    metrics = httpx.get(base_url + "/metrics", timeout=30).text
    for replica in set(home):
        assert f'moepager_num_requests_running{{replica="{replica}"}}' in metrics
        assert _metric(metrics, "moepager_prompt_tokens_total", replica=replica) > 0
    assert _metric(metrics, "moepager_affinity_requests_total", outcome="hit") >= n
    assert _metric(metrics, "moepager_affinity_requests_total", outcome="moved") == 0
    missing = used_names() - KV_METRICS - exported_names(metrics)
    assert not missing, f"dashboard/alerts read metrics the Ray app does not export: {sorted(missing)}"


def test_killing_a_replica_mid_load_loses_no_request(base_url):
    n = 24
    requests = [({}, {"model": "moepager-default", "max_tokens": 40, "temperature": 0,
                      "messages": [{"role": "user", "content": f"Load {i}: tell a long story."}]})
                for i in range(n)]

    async def scenario():
        load = asyncio.ensure_future(_post_all(base_url, requests, timeout=150.0))
        victim = None
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            deadline = time.monotonic() + 60
            while victim is None and time.monotonic() < deadline and not load.done():
                text = (await client.get("/metrics")).text
                busy = re.findall(r'moepager_num_requests_running\{replica="([^"]+)"\} ([0-9.]+)', text)
                victim = next((r for r, value in busy if float(value) > 0), None)
                await asyncio.sleep(0.2)
        assert victim is not None, "no replica was ever busy"
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#MoepagerReplica#{victim}", namespace="serve"),
                 no_restart=True)
        return victim, await load

    victim, responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * n, [r.text[:200] for r in responses if r.status_code != 200]
    served_by = {r.headers["x-moepager-replica"] for r in responses}
    assert served_by - {victim}, served_by  # the survivor (or a replacement) finished the load
    assert all(r.json()["choices"][0]["finish_reason"] in ("stop", "length") for r in responses)


def test_config_file_builds_the_app():
    yaml = pytest.importorskip("yaml")
    from deploy.ray.app import AppArgs, build_app, parse_serve_args

    config = yaml.safe_load((ROOT / "deploy/ray/config.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "deploy.ray.app:build_app"
    args = AppArgs(**application["args"])
    assert parse_serve_args(args.serve_args).max_num_seqs == 16
    assert build_app(application["args"]) is not None
    with pytest.raises(ValueError, match="http_options"):
        build_app({"serve_args": ["--port", "9000"]})
    with pytest.raises(ValueError, match="invalid serve_args"):
        build_app({"serve_args": ["--cache-policy", "no-such-policy"]})
