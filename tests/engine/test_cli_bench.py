"""`moepager bench ...` exists and forwards to the benchmark modules; every named subcommand imports."""

from __future__ import annotations

import importlib
import json

import pytest

from server.cli import SUBCOMMANDS, main


@pytest.mark.parametrize("name,module", SUBCOMMANDS)
def test_every_named_subcommand_exists(name, module):
    assert hasattr(importlib.import_module(module), "add_parser"), name


def test_bench_sim_speed_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "speed.json"
    rc = main(["bench", "sim-speed", "--tokens", "40", "--layers", "2", "--experts", "8", "--top-k", "2",
               "--slots-per-layer", "3", "--policies", "lru,lfu", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["policy"] for r in rows] == ["lru", "lfu"] and all(0 <= r["hit_rate"] <= 1 for r in rows)


def test_bench_unknown_verb_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bench_long_context_runs_both_caches_and_writes_json(tmp_path, capsys):
    out = tmp_path / "long.json"
    rc = main(["bench", "long-context", "--small", "--model-dir", str(tmp_path / "model"), "--contexts", "8,200",
               "--tokens", "4", "--repeat", "1", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["context"] for r in rows] == [8, 200]
    for r in rows:
        assert r["in_place_ms_per_token"] > 0 and r["concatenate_ms_per_token"] > 0
        assert r["speedup"] == r["concatenate_ms_per_token"] / r["in_place_ms_per_token"]
    # the benchmark puts the engine's own cache factory back when it is done
    from engine import generation
    from engine.kv_rows import growing_cache

    assert generation.growing_cache is growing_cache


def test_bench_long_context_compares_attention_and_restores_native(tmp_path, capsys):
    from cuda_ext import native_cpu

    if not native_cpu.available():
        pytest.skip(f"native CPU kernels unavailable: {native_cpu.status()}")
    out = tmp_path / "attn.json"
    rc = main(["bench", "long-context", "--small", "--compare", "attention", "--model-dir", str(tmp_path / "model"),
               "--contexts", "8,120", "--tokens", "3", "--repeat", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["compare"] == "attention"
    for r in report["rows"]:
        assert r["native_ms_per_token"] > 0 and r["sdpa_ms_per_token"] > 0
        assert r["speedup"] == r["sdpa_ms_per_token"] / r["native_ms_per_token"]
    assert "native ms/tok" in capsys.readouterr().out


def test_bench_long_context_rejects_contexts_past_the_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "long-context", "--small", "--model-dir", str(tmp_path / "model"), "--contexts", "5000"])
    assert exc.value.code == 2
    assert "--contexts" in capsys.readouterr().err


def test_offload_overhead_times_decode_layers_and_profiles(tmp_path, capsys):
    def overhead(args):
        return main(["bench", "offload-overhead", *args])

    out = tmp_path / "overhead.json"
    rc = overhead(["--small", "--model-dir", str(tmp_path / "model"), "--tokens", "4", "--repeat", "2", "--profile",
                   "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert len(runs) == 2 and all(r["layer_calls"] == 3 * 4 for r in runs)  # 3 decode tokens x 4 MoE layers
    assert all(0 < r["overhead_us_per_layer_median"] and 0 < r["ms_per_token"] for r in runs)
    assert any(row["op"].endswith("moe_ffn") for row in report["profile"])
    with pytest.raises(SystemExit) as exc:
        overhead(["--small", "--tokens", "1"])
    assert exc.value.code == 2 and "--tokens" in capsys.readouterr().err
