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
