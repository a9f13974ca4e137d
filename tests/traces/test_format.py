"""Trace files: round trip, validation, and the engine's recorder API."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tests.traces.helpers import make_trace
from traces import TraceFormatError, TraceRecorder, load_trace, save_trace


def test_round_trip_keeps_arrays_dtypes_and_meta(tmp_path):
    trace = make_trace([[[0, 1], [2, 3]], [[1, 2], [3, 0]]], 4, request=[5, 5], step=[0, 1], hidden_size=3)
    path = tmp_path / "t.safetensors"
    save_trace(path, trace)
    back = load_trace(path)
    for name in ("experts", "weights", "request", "position", "phase", "step", "hidden"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name))
    assert back.experts.dtype == np.int16 and back.weights.dtype == np.float16 and back.phase.dtype == np.int8
    assert back.meta == trace.meta
    assert back.tokens is None
    assert load_trace(path, hidden=False).hidden is None


def test_bad_files_raise_clear_errors(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(TraceFormatError, match="not a readable"):
        load_trace(junk)
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "missing.safetensors")
    bad = make_trace([[0, 1]], 4)
    bad.meta["experts"] = 1  # expert id 1 out of range
    with pytest.raises(TraceFormatError, match="expert ids"):
        save_trace(tmp_path / "bad.safetensors", bad)
    from safetensors.numpy import save_file

    save_file({"experts": np.zeros((1, 1, 1), np.int16)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(TraceFormatError, match="missing"):
        load_trace(tmp_path / "other.safetensors")


def _step(rec, rows, layers=2, k=2, phase=1, hidden=None):
    rec.begin_step(torch.tensor(rows), torch.arange(len(rows)), phase, torch.tensor(rows) * 10)
    for layer in range(layers):
        idx = torch.tensor([[layer, layer + 1]] * len(rows))
        rec.record(layer, idx, torch.full((len(rows), k), 0.5, dtype=torch.bfloat16),
                   None if hidden is None else torch.ones(len(rows), hidden))
    rec.end_step()


def test_recorder_writes_steps_in_order(tmp_path):
    path = tmp_path / "rec.safetensors"
    meta = {"model": "m", "architecture": "olmoe", "moe_layers": [1, 3], "experts": 4, "top_k": 2}
    with TraceRecorder(path, meta, record_hidden=True) as rec:
        _step(rec, [7, 7, 7], phase=0, hidden=5)  # a prefill of 3 rows
        _step(rec, [7], phase=1, hidden=5)
    trace = load_trace(path)
    assert trace.num_rows == 4 and trace.num_layers == 2 and trace.top_k == 2
    assert trace.step.tolist() == [0, 0, 0, 1]
    assert trace.phase.tolist() == [0, 0, 0, 1]
    assert trace.tokens.tolist() == [70, 70, 70, 70]
    assert trace.experts[0].tolist() == [[0, 1], [1, 2]]
    assert trace.hidden.shape == (4, 2, 5)
    assert trace.meta["moe_layers"] == [1, 3]


def test_recorder_rejects_misuse(tmp_path):
    rec = TraceRecorder(tmp_path / "x.safetensors", {"experts": 4, "top_k": 2})
    rec.begin_step(torch.tensor([0]), torch.tensor([0]), 1)
    with pytest.raises(ValueError, match="expected MoE layer 0"):
        rec.record(1, torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"expected \[1, K\]"):
        rec.record(0, torch.tensor([[0, 1], [1, 2]]), torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="experts"):
        TraceRecorder(tmp_path / "y.safetensors", {"top_k": 2})


def test_recorder_stops_at_max_rows_and_says_so(tmp_path, caplog):
    path = tmp_path / "cap.safetensors"
    rec = TraceRecorder(path, {"experts": 4, "top_k": 2}, max_rows=3)
    with caplog.at_level(logging.WARNING):
        _step(rec, [0, 0])
        _step(rec, [0, 0])  # would exceed 3 rows: dropped
        _step(rec, [0])  # dropped too (recording stopped)
    rec.close()
    assert "max_rows=3" in caplog.text
    assert rec.dropped_steps == 2
    assert load_trace(path).num_rows == 2
