"""bench/serve_load.py against a live server: it runs, reports every level, writes JSON."""

from __future__ import annotations

import json

from bench.serve_load import main


def test_serve_load_reports_levels(server_url, tmp_path, capsys):
    out = tmp_path / "load.json"
    assert main(["--url", server_url, "--concurrency", "1,3", "--requests-per-client", "1", "--max-tokens", "5",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["concurrency"] for r in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["errors"] == 0 and level["output_tokens"] == 5 * level["requests"]
        assert level["ttft_p50_s"] > 0 and level["itl_p99_s"] >= level["itl_p50_s"] > 0
    assert "TTFT p50" in capsys.readouterr().out


def test_serve_load_structured(tmp_path, engine):
    from serving_helpers import live_server, make_app

    out = tmp_path / "load.json"
    with live_server(make_app(engine, chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")) as url:
        assert main(["--url", url, "--concurrency", "2", "--requests-per-client", "1", "--max-tokens", "60",
                     "--structured", "json_schema", "--out", str(out)]) == 0
    (level,) = json.loads(out.read_text())["levels"]
    assert level["errors"] == 0 and level["output_tokens"] > 0
