"""Metric names used by deploy/: the Grafana dashboard and the PrometheusRule alerts."""

from __future__ import annotations

import json
import re
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NAME = re.compile(r"moepager_[a-z_]+")
# The server's KV gauges: the KV alert reads them; a server without them never fires it.
KV_METRICS = frozenset({"moepager_kv_cache_used_bytes", "moepager_kv_cache_budget_bytes"})
# Exported by the Ray Serve app's /metrics only (checked against it in test_ray_serve.py).
RAY_METRICS = frozenset({"moepager_affinity_requests_total"})


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/moepager.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_rules() -> list[dict]:
    import yaml

    docs = list(yaml.safe_load_all((DEPLOY / "k8s/monitoring.yaml").read_text()))
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def used_names() -> set[str]:
    """Every series name (with _total/_bucket suffixes as written) in the dashboard and the alerts."""
    exprs = dashboard_exprs() + [rule["expr"] for rule in alert_rules()]
    return {name for expr in exprs for name in NAME.findall(expr)}


def exported_names(metrics_text: str) -> set[str]:
    """Series names that carry a sample in a Prometheus exposition."""
    return {line.split("{")[0].split(" ")[0] for line in metrics_text.splitlines()
            if line.startswith("moepager_")}
