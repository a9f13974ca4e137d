"""``moepager trace ...`` through ``server.cli.main``: import, stats, simulate, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.cli import main
from tests.traces.helpers import make_trace
from traces import load_trace, save_trace

SIM_KEYS = {"hit_rate", "hits", "accesses", "bytes_moved", "prefetch"}


def _last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def _trace_file(tmp_path, rows=None, experts=4):
    rows = rows or [[[0, 1], [2, 3]], [[0, 2], [2, 3]], [[1, 3], [0, 1]], [[0, 1], [2, 3]]]
    path = tmp_path / "t.safetensors"
    save_trace(path, make_trace(rows, experts))
    return str(path)


def test_import_npz(tmp_path, capsys):
    src = tmp_path / "r.npz"
    experts = np.array([[[0, 3], [1, 2]], [[3, 0], [2, 1]]], dtype=np.int64)
    np.savez(src, experts=experts, request=np.array([4, 4]), meta=json.dumps({"experts": 4, "top_k": 2}))
    out = tmp_path / "t.safetensors"
    assert main(["trace", "import", str(src), "--out", str(out)]) == 0
    trace = load_trace(out)
    np.testing.assert_array_equal(trace.experts, experts)
    assert trace.request.tolist() == [4, 4] and trace.position.tolist() == [0, 1]
    assert trace.weights.dtype == np.float16


def test_import_jsonl(tmp_path):
    src = tmp_path / "r.jsonl"
    recs = [{"meta": {"experts": 8, "model": "ext"}}]
    for req in (0, 1):
        for tok in range(2):
            for layer in range(3):
                recs.append({"request": req, "layer": layer, "token": tok, "experts": [layer, tok + 4],
                             "weights": [0.75, 0.25]})
    src.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "t.safetensors"
    assert main(["trace", "import", str(src), "--out", str(out)]) == 0
    trace = load_trace(out)
    assert trace.experts.shape == (4, 3, 2) and trace.num_experts == 8 and trace.meta["model"] == "ext"
    assert trace.request.tolist() == [0, 0, 1, 1] and trace.position.tolist() == [0, 1, 0, 1]
    assert trace.experts[1, 2].tolist() == [2, 5]
    assert trace.weights[0, 0].tolist() == [0.75, 0.25]


@pytest.mark.parametrize("name,content,message", [
    ("bad.npz", b"not a zip", "not a readable .npz"),
    ("bad.jsonl", b'{"request": 0, "layer": 0, "token": 0, "experts": [1]}\n{oops\n', "bad.jsonl:2: not valid JSON"),
    ("k.jsonl", (b'{"request": 0, "layer": 0, "token": 0, "experts": [1]}\n'
                 b'{"request": 0, "layer": 0, "token": 1, "experts": [1, 2]}\n'), "same number of experts"),
    ("bad.csv", b"1,2,3", "unknown routing format"),
])
def test_import_bad_files_fail_with_one_line(tmp_path, capsys, name, content, message):
    src = tmp_path / name
    src.write_bytes(content)
    assert main(["trace", "import", str(src), "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moepager: error:") and message in err and "\n" not in err


def test_import_npz_without_meta(tmp_path, capsys):
    src = tmp_path / "nometa.npz"
    np.savez(src, experts=np.zeros((1, 1, 1), np.int32))
    assert main(["trace", "import", str(src), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "lacks 'meta'" in capsys.readouterr().err


def test_stats_json(tmp_path, capsys):
    assert main(["trace", "stats", _trace_file(tmp_path), "--json"]) == 0
    stats = _last_json(capsys)
    assert stats["layers"] == 2 and len(stats["entropy"]) == 2
    assert {"reuse_distance", "consecutive_overlap", "co_activation"} <= set(stats)


def test_simulate_json_keys(tmp_path, capsys):
    path = _trace_file(tmp_path)
    assert main(["trace", "simulate", path, "--policy", "lru", "--slots-per-layer", "2", "--json"]) == 0
    d = _last_json(capsys)
    assert SIM_KEYS <= set(d) and d["accesses"] == 16
    assert main(["trace", "simulate", path, "--policy", "lfu", "--capacity-fraction", "0.5", "--json",
                 "--link-gbps", "10", "--expert-bytes", "1000", "--layer-compute-us", "5"]) == 0
    d = _last_json(capsys)
    assert SIM_KEYS | {"stall_seconds_per_token", "tokens_per_second"} <= set(d)
    assert d["bytes_moved"] == 1000 * (d["accesses"] - d["hits"])


def test_simulate_all_policies_and_prefetch(tmp_path, capsys):
    path = _trace_file(tmp_path)
    assert main(["trace", "simulate", path, "--policy", "all", "--slots-per-layer", "2", "--cache-scope", "global",
                 "--json"]) == 0
    d = _last_json(capsys)
    assert "belady" in d and "lru" in d and all(SIM_KEYS <= set(v) for v in d.values())
    assert all(v["hits"] <= d["belady"]["hits"] for v in d.values())
    assert main(["trace", "simulate", path, "--slots-per-layer", "3", "--prefetch", "oracle", "--json"]) == 0
    assert _last_json(capsys)["prefetch"]["issued"] > 0


def test_simulate_errors(tmp_path, capsys):
    path = _trace_file(tmp_path)
    assert main(["trace", "simulate", path, "--slots-per-layer", "2", "--cache-split", "weird"]) == 2
    assert "cache-split" in capsys.readouterr().err
    assert main(["trace", "simulate", str(tmp_path / "missing.safetensors"), "--slots-per-layer", "2"]) == 2


def test_plot_needs_matplotlib(tmp_path, capsys):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert main(["trace", "simulate", _trace_file(tmp_path), "--slots-per-layer", "2",
                     "--plot", str(tmp_path / "p.png")]) == 2
        assert "matplotlib" in capsys.readouterr().err
    else:
        assert main(["trace", "simulate", _trace_file(tmp_path), "--slots-per-layer", "2",
                     "--plot", str(tmp_path / "p.png")]) == 0
        assert (tmp_path / "p.png").exists()
