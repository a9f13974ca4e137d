"""Importing routing recorded elsewhere into the trace format: ``.npz`` and JSON Lines.

- ``.npz``: ``experts [N, L, K]`` (any integer dtype), optional ``request [N]``,
  ``weights [N, L, K]``, ``position [N]``, ``phase [N]``, ``tokens [N]``, and
  ``meta``: a JSON string with at least ``experts`` and ``top_k``.
- JSON Lines: one record per (request, token, layer):
  ``{"request", "layer", "token", "experts": [K ids], "weights": [K]}``; an
  optional ``{"meta": {...}}`` line gives metadata (``experts`` defaults to the
  largest id + 1). Rows are ordered by first appearance of (request, token).

Missing fields default to: one request, positions 0.., decode phase, uniform weights.
"""

from __future__ import annotations

import json
import os

import numpy as np

from traces.format import Trace, TraceFormatError


def _defaults(experts: np.ndarray, meta: dict, request=None, weights=None, position=None, phase=None,
              tokens=None) -> Trace:
    n, _, k = experts.shape
    if request is None:
        request = np.zeros(n, dtype=np.int32)
    if position is None:
        position = np.zeros(n, dtype=np.int32)
        request_arr = np.asarray(request)
        for req in np.unique(request_arr):
            idx = np.flatnonzero(request_arr == req)
            position[idx] = np.arange(len(idx))
    if phase is None:
        phase = np.ones(n, dtype=np.int8)
    if weights is None:
        weights = np.full(experts.shape, 1.0 / k, dtype=np.float16)
    meta = dict(meta)
    meta.setdefault("experts", int(experts.max()) + 1 if experts.size else 1)
    meta.setdefault("top_k", k)
    return Trace(experts=experts.astype(np.int16), weights=np.asarray(weights, dtype=np.float16),
                 request=np.asarray(request).astype(np.int32), position=np.asarray(position).astype(np.int32),
                 phase=np.asarray(phase).astype(np.int8),
                 tokens=None if tokens is None else np.asarray(tokens).astype(np.int32), meta=meta)


def import_npz(path: str) -> Trace:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - zip or pickle errors from numpy
        raise TraceFormatError(f"{path}: not a readable .npz file ({type(exc).__name__})") from None
    with data:
        if "experts" not in data.files:
            raise TraceFormatError(f"{path}: .npz lacks the 'experts' array [N, L, K]")
        experts = data["experts"]
        if experts.ndim != 3 or not np.issubdtype(experts.dtype, np.integer):
            raise TraceFormatError(f"{path}: 'experts' must be an integer array [N, L, K], got {experts.dtype} "
                                   f"{experts.shape}")
        if "meta" not in data.files:
            raise TraceFormatError(f"{path}: .npz lacks 'meta' (a JSON string with at least experts and top_k)")
        try:
            meta = json.loads(str(data["meta"]))
        except json.JSONDecodeError as exc:
            raise TraceFormatError(f"{path}: 'meta' is not valid JSON ({exc.msg})") from None
        if not isinstance(meta, dict) or "experts" not in meta or "top_k" not in meta:
            raise TraceFormatError(f"{path}: 'meta' must be a JSON object with 'experts' and 'top_k'")
        extra = {name: data[name] for name in ("request", "weights", "position", "phase", "tokens")
                 if name in data.files}
    trace = _defaults(experts, meta, **extra)
    trace.validate(path)
    return trace


def import_jsonl(path: str) -> Trace:
    meta: dict = {}
    rows: dict[tuple[int, int], dict[int, tuple[list[int], list[float] | None]]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise TraceFormatError(f"{path}:{lineno}: each line must be a JSON object")
            if "meta" in rec:
                meta.update(rec["meta"])
                continue
            missing = [k for k in ("request", "layer", "token", "experts") if k not in rec]
            if missing:
                raise TraceFormatError(f"{path}:{lineno}: record lacks {', '.join(missing)}")
            try:
                key = (int(rec["request"]), int(rec["token"]))
                layer = int(rec["layer"])
                experts = [int(x) for x in rec["experts"]]
                weights = None if rec.get("weights") is None else [float(x) for x in rec["weights"]]
            except (TypeError, ValueError):
                raise TraceFormatError(f"{path}:{lineno}: request, layer, token must be integers and "
                                       "experts a list of integers") from None
            if weights is not None and len(weights) != len(experts):
                raise TraceFormatError(f"{path}:{lineno}: {len(weights)} weights for {len(experts)} experts")
            rows.setdefault(key, {})[layer] = (experts, weights)
    if not rows:
        raise TraceFormatError(f"{path}: no routing records")
    layers = sorted({layer for r in rows.values() for layer in r})
    if layers != list(range(len(layers))):
        raise TraceFormatError(f"{path}: layers must be 0..L-1, found {layers[:8]}")
    ks = {len(e) for r in rows.values() for e, _ in r.values()}
    if len(ks) != 1:
        raise TraceFormatError(f"{path}: every record needs the same number of experts (top-k), found {sorted(ks)}")
    k = ks.pop()
    n, num_layers = len(rows), len(layers)
    experts = np.zeros((n, num_layers, k), dtype=np.int64)
    weights = np.full((n, num_layers, k), 1.0 / k, dtype=np.float32)
    request = np.zeros(n, dtype=np.int32)
    position = np.zeros(n, dtype=np.int32)
    for i, ((req, tok), by_layer) in enumerate(rows.items()):
        if len(by_layer) != num_layers:
            raise TraceFormatError(f"{path}: request {req} token {tok} has {len(by_layer)} of {num_layers} layers")
        request[i], position[i] = req, tok
        for layer, (e, w) in by_layer.items():
            experts[i, layer] = e
            if w is not None:
                weights[i, layer] = w
    if (experts < 0).any():
        raise TraceFormatError(f"{path}: negative expert ids")
    trace = _defaults(experts, meta, request=request, weights=weights, position=position)
    trace.validate(path)
    return trace


def import_trace(path: str) -> Trace:
    """Import by extension: ``.npz`` or ``.jsonl``/``.json``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        return import_npz(path)
    if ext in (".jsonl", ".json", ".ndjson"):
        return import_jsonl(path)
    raise TraceFormatError(f"{path}: unknown routing format {ext or '(no extension)'!r}; use .npz or .jsonl")
