"""deploy/ files parse and agree with each other, and every metric the dashboard and the alert
rules read is exported by a live moepager server (the embedded model, scraped over HTTP)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import pytest
from manifest_names import DEPLOY, KV_METRICS, RAY_METRICS, alert_rules, exported_names, used_names

yaml = pytest.importorskip("yaml")


def _docs(relative: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / relative).read_text()))


def test_yaml_files_parse():
    paths = [*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]
    assert len(paths) >= 8
    for path in paths:
        assert list(yaml.safe_load_all(path.read_text())), path


def test_dockerfile_has_both_variants_and_extras():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in text and "base-cuda" in text and "FROM base-${VARIANT}" in text
    assert "ARG EXTRAS=server" in text and '".[${EXTRAS}]"' in text and "COPY deploy ./deploy" in text


def test_alert_rules_cover_stall_hit_rate_queue_and_kv():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for name in ("MoepagerExpertStallHigh", "MoepagerExpertHitRateLow", "MoepagerQueueGrowing",
                 "MoepagerKVCacheNearBudget", "MoepagerAffinityHitRateLow"):
        assert name in rules, name
    for rule in rules.values():
        assert rule["expr"].strip() and rule["for"] and rule["labels"]["severity"] and rule["annotations"]["summary"]


def test_service_monitor_selects_both_services():
    (monitor,) = [d for d in _docs("k8s/monitoring.yaml") if d["kind"] == "ServiceMonitor"]
    (expression,) = monitor["spec"]["selector"]["matchExpressions"]
    port = monitor["spec"]["endpoints"][0]["port"]
    services = [d for f in ("k8s/moepager.yaml", "k8s/rayservice.yaml") for d in _docs(f) if d["kind"] == "Service"]
    assert len(services) == 2
    for service in services:
        assert service["metadata"]["labels"][expression["key"]] in expression["values"]
        assert port in [p["name"] for p in service["spec"]["ports"]]


def test_rayservice_serve_config_is_a_valid_app():
    from deploy.ray.app import AppArgs, parse_serve_args

    (service,) = [d for d in _docs("k8s/rayservice.yaml") if d["kind"] == "RayService"]
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == "deploy.ray.app:build_app"
    args = AppArgs(**application["args"])
    assert args.replica_gpus == 1 and parse_serve_args(args.serve_args).device == "cuda"
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == 1


@contextlib.contextmanager
def _live_server(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise TimeoutError("server did not become healthy")
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def live_metrics() -> str:
    """``/metrics`` of a live server on the embedded model after one streamed and one plain request."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from server.app import create_app

    engine = Engine.from_config(EngineConfig(device="cpu", progress=False))
    with _live_server(create_app(engine)) as base:
        body = {"model": "moepager-default", "prompt": "The cat", "max_tokens": 4}
        assert httpx.post(base + "/v1/completions", json=body, timeout=60).status_code == 200
        with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            r.read()
        assert httpx.get(base + "/v1/models", headers={"Authorization": "x"}, timeout=10).status_code == 200
        return httpx.get(base + "/metrics", timeout=10).text


def test_dashboard_and_alerts_read_metrics_a_live_server_exports(live_metrics):
    exported = exported_names(live_metrics)
    used = used_names()
    assert len(used) >= 12, used
    missing = used - exported - RAY_METRICS
    assert not missing, f"not in a live server's /metrics: {sorted(missing)}"


def test_kv_alert_reads_metrics_a_live_server_exports(live_metrics):
    assert KV_METRICS <= used_names()
    assert KV_METRICS <= exported_names(live_metrics)
