"""deploy/ files parse, and the dashboard and scrape config only use metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from server.metrics import OFFLOAD_METRICS, SERVING_METRICS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
yaml = pytest.importorskip("yaml")


def test_yaml_files_parse():
    for path in [*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]:
        assert list(yaml.safe_load_all(path.read_text())), path


def test_dashboard_queries_known_metrics():
    dashboard = json.loads((DEPLOY / "grafana/dashboards/moepager.json").read_text())
    known = {"moepager_" + n for n in SERVING_METRICS + OFFLOAD_METRICS}
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"moepager_[a-z_]+", target["expr"]):
                used.add(re.sub(r"_(bucket|sum|count)$", "", name))
    assert used and used <= known, used - known
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    assert "hit rate" in titles and "stall" in titles and "first token" in titles


def test_dockerfile_has_both_variants():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in text and "base-cuda" in text and "FROM base-${VARIANT}" in text
