"""bench.attention: times both methods for every case it names, agrees with SDPA, rejects bad flags."""

from __future__ import annotations

import json

import pytest

from bench import attention as bench_attention
from cuda_ext import native_cpu


@pytest.mark.skipif(not native_cpu.available(), reason="needs the native CPU kernels")
def test_attention_bench_times_every_case_and_writes_json(tmp_path, capsys):
    out = tmp_path / "attn.json"
    rc = bench_attention.main(["--contexts", "3,40", "--dtypes", "float32", "--calls", "2", "--repeat", "1",
                               "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["context"]) for r in rows] == [(s, L) for s in bench_attention.SHAPES for L in (3, 40)]
    for r in rows:
        assert r["sdpa_us"] > 0 and r["native_us"] > 0
        assert r["speedup"] == r["sdpa_us"] / r["native_us"]
        assert r["max_abs_diff"] < 1e-5  # the two methods compute the same attention
    assert "gqa32/8x128" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--contexts", "1,x"], ["--contexts", "0"], ["--dtypes", "int8"],
                                   ["--shapes", "nope"], ["--calls", "0"]])
def test_attention_bench_rejects_bad_flags(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_attention.main(flags)
    assert exc.value.code == 2
    assert "--" in capsys.readouterr().err
