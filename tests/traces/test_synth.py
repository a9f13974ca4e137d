"""Synthetic traces: deterministic by seed, each knob moves the property it names, CLI round trip."""

from __future__ import annotations

import numpy as np
import pytest

from server.cli import main
from traces import load_trace
from traces.synth import REGIMES, SynthConfig, regime, synth_trace

SMALL = {"layers": 3, "experts": 16, "top_k": 2, "requests": 4, "prompt_len": 8, "decode_len": 40}


def _overlap(trace) -> float:
    """Share of a decode token's experts that the previous token of its request used (same layer)."""
    ex, req, phase = trace.experts, trace.request, trace.phase
    same = (req[1:] == req[:-1]) & (phase[1:] == 1)
    a, b = ex[1:][same], ex[:-1][same]  # [M, L, K]
    hits = (a[..., :, None] == b[..., None, :]).any(-1)
    return float(hits.mean())


def _top_share(trace, n: int = 4) -> float:
    """Share of all routings that go to each layer's ``n`` most used experts."""
    shares = []
    for layer in range(trace.num_layers):
        counts = np.bincount(trace.experts[:, layer].ravel(), minlength=trace.num_experts)
        shares.append(np.sort(counts)[::-1][:n].sum() / counts.sum())
    return float(np.mean(shares))


def test_same_seed_same_trace_other_seed_other_trace():
    a, b = synth_trace(regime("mixed", seed=7, **SMALL)), synth_trace(regime("mixed", seed=7, **SMALL))
    c = synth_trace(regime("mixed", seed=8, **SMALL))
    for name in ("experts", "weights", "request", "position", "phase", "step"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.experts, c.experts)


def test_rows_requests_phases_and_steps():
    t = synth_trace(SynthConfig(**SMALL))
    t.validate()
    k = t.top_k
    assert t.experts.shape[1:] == (3, k)
    # distinct experts per token and layer, ids in range
    srt = np.sort(t.experts, axis=-1)
    assert (np.diff(srt, axis=-1) > 0).all() and srt.min() >= 0 and srt.max() < 16
    for r in range(4):
        rows = np.flatnonzero(t.request == r)
        prompt = rows[t.phase[rows] == 0]
        decode = rows[t.phase[rows] == 1]
        assert len(prompt) >= 1 and t.position[rows].tolist() == list(range(len(rows)))
        assert len(set(t.step[prompt].tolist())) == 1  # the prompt is one prefill step
        assert len(set(t.step[decode].tolist())) == len(decode)  # one step per decode token
    assert (np.diff(t.step) >= 0).all()


def test_locality_knob_raises_token_overlap():
    low = synth_trace(SynthConfig(skew=0.0, locality=0.0, **SMALL))
    high = synth_trace(SynthConfig(skew=0.0, locality=0.8, **SMALL))
    chance = 2 / 16  # top-2 of 16 uniform experts
    assert abs(_overlap(low) - chance) < 0.05
    assert _overlap(high) > 0.75


def test_skew_knob_concentrates_routing():
    flat = synth_trace(SynthConfig(skew=0.0, locality=0.0, **SMALL))
    skewed = synth_trace(SynthConfig(skew=1.5, locality=0.0, **SMALL))
    assert _top_share(flat) < 0.4
    assert _top_share(skewed) > 0.6


def test_cross_layer_knob_makes_paths():
    def path_rate(t):
        # the most frequent (layer 0 expert -> layer 1 expert) pair share among layer-0 experts
        pairs = np.zeros((16, 16))
        for row in t.experts:
            for a in row[0]:
                for b in row[1]:
                    pairs[a, b] += 1
        return float((pairs.max(axis=1) / np.maximum(pairs.sum(axis=1), 1)).mean())

    none = SynthConfig(skew=0.0, locality=0.0, cross_layer=0.0, **SMALL)
    strong = SynthConfig(skew=0.0, locality=0.0, cross_layer=0.9, **SMALL)
    assert path_rate(synth_trace(strong)) > path_rate(synth_trace(none)) + 0.2


def test_drift_moves_the_popular_experts():
    cfg = dict(SMALL, requests=2, decode_len=400)
    still = synth_trace(SynthConfig(skew=1.5, locality=0.0, drift=0.0, **cfg))
    moving = synth_trace(SynthConfig(skew=1.5, locality=0.0, drift=0.2, **cfg))

    def top_changes(t):
        n = t.num_rows // 2
        first = np.bincount(t.experts[:n, 0].ravel(), minlength=16).argsort()[-3:]
        last = np.bincount(t.experts[n:, 0].ravel(), minlength=16).argsort()[-3:]
        return len(set(first.tolist()) ^ set(last.tolist()))

    assert top_changes(moving) > top_changes(still)


def test_every_regime_builds_and_bad_knobs_fail():
    for name in REGIMES:
        synth_trace(regime(name, **dict(SMALL, requests=1))).validate()
    with pytest.raises(ValueError, match="known regimes"):
        regime("nope")
    with pytest.raises(ValueError, match="locality"):
        synth_trace(SynthConfig(locality=1.5))


def test_cli_writes_the_same_trace(tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    assert main(["trace", "synth", "--regime", "topics", "--seed", "3", "--layers", "3", "--experts", "16",
                 "--top-k", "2", "--requests", "3", "--prompt-len", "8", "--decode-len", "20",
                 "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = load_trace(out)
    direct = synth_trace(regime("topics", seed=3, layers=3, experts=16, top_k=2, requests=3, prompt_len=8,
                                decode_len=20))
    np.testing.assert_array_equal(loaded.experts, direct.experts)
    np.testing.assert_array_equal(loaded.step, direct.step)
    assert loaded.meta["synth"]["topics"] == 8


def test_cli_rejects_a_bad_knob(tmp_path, capsys):
    assert main(["trace", "synth", "--locality", "2", "--out", str(tmp_path / "x.safetensors")]) != 0
    assert "locality" in capsys.readouterr().err
