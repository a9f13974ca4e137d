"""bench.kernels_hot: times every page kind it names and rejects bad flags."""

from __future__ import annotations

import json

import pytest

from bench import kernels_hot
from cuda_ext import native_cpu


@pytest.mark.skipif(not native_cpu.available(), reason="needs the native CPU kernels")
def test_kernels_hot_times_every_kind_and_writes_json(tmp_path, capsys):
    out = tmp_path / "hot.json"
    assert kernels_hot.main(["--tokens", "1,2", "--calls", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    got = [(r["kernel"], r["T"]) for r in report["results"]]
    assert got == [(name, t) for name, _, _ in kernels_hot.CASES for t in (1, 2)]
    assert all(r["us_per_call"] > 0 for r in report["results"])
    assert report["meta"]["native"] == native_cpu.status()
    assert "int4 g32" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--tokens", "1,x"], ["--tokens", "0"], ["--calls", "0"]])
def test_kernels_hot_rejects_bad_flags(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        kernels_hot.main(flags)
    assert exc.value.code == 2
    assert "--" in capsys.readouterr().err
