"""Recording routing from the live engine into a trace file.

The engine calls, per forward pass::

    rec.begin_step(request, position, phase, tokens)     # [T] each (phase may be an int)
    rec.record(layer, top_k_index, top_k_weights, hidden, scores)  # once per MoE layer, in order
    rec.end_step()

and ``rec.close()`` at shutdown (``flush()`` writes what is recorded so far and
keeps recording). Rows are copied to host numpy arrays at once (the engine has
already synced ``top_k_index`` to the host for the cache), so the recorder never
holds device memory. ``scores`` (router probabilities ``[T, E]``) are given
by the engine with cache-aware routing on; a trace holds them for every step
or for none. The ``step`` array of the file is the index of the forward
pass, which lets the simulator replay batched steps as the engine ran them.
Past ``max_rows`` rows the recorder stops recording, warns once, and still
writes what it has.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Self

import numpy as np
import torch

from traces.format import Trace, save_trace

log = logging.getLogger(__name__)


def _host(t: torch.Tensor | np.ndarray | int, dtype: np.dtype, rows: int, name: str) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        arr = t.detach().to("cpu").numpy()
    else:
        arr = np.asarray(t)
    if arr.ndim == 0:
        arr = np.full((rows,), arr)
    if arr.shape[0] != rows:
        raise ValueError(f"trace recorder: {name} has {arr.shape[0]} rows, expected {rows}")
    return arr.astype(dtype, copy=False)


class TraceRecorder:
    def __init__(self, path: str | os.PathLike, meta: dict[str, Any], *, record_hidden: bool = False,
                 max_rows: int = 1_000_000) -> None:
        for key in ("experts", "top_k"):
            if key not in meta:
                raise ValueError(f"trace recorder: metadata needs {key!r}")
        self.path = os.fspath(path)
        self.meta = dict(meta)
        self.record_hidden = bool(record_hidden)
        self.max_rows = int(max_rows)
        self.num_layers: int | None = len(meta["moe_layers"]) if meta.get("moe_layers") is not None else None
        self.rows = 0
        self.steps = 0
        self.dropped_steps = 0
        self.full = False
        self.closed = False
        self._chunks: dict[str, list[np.ndarray]] = {n: [] for n in
                                                     ("experts", "weights", "request", "position", "phase",
                                                      "tokens", "hidden", "step", "scores")}
        self._has_tokens: bool | None = None
        self._has_scores: bool | None = None
        self._step: dict[str, Any] | None = None

    # -- per forward pass -------------------------------------------------------------
    def begin_step(self, request: torch.Tensor, position: torch.Tensor, phase: int | torch.Tensor,
                   tokens: torch.Tensor | None = None) -> None:
        if self.closed:
            raise RuntimeError("trace recorder is closed")
        if self._step is not None:
            raise RuntimeError("trace recorder: begin_step() called twice without end_step()")
        rows = int(request.shape[0])
        if not self.full and self.rows + rows > self.max_rows:
            self.full = True
            log.warning("trace recorder: reached max_rows=%d; further steps are not recorded to %s",
                        self.max_rows, self.path)
        self._step = {
            "rows": rows,
            "skip": self.full,
            "layer": 0,
            "experts": [],
            "weights": [],
            "hidden": [],
            "scores": [],
        }
        if self.full:
            return
        self._step["request"] = _host(request, np.int32, rows, "request")
        self._step["position"] = _host(position, np.int32, rows, "position")
        self._step["phase"] = _host(phase, np.int8, rows, "phase")
        self._step["tokens"] = None if tokens is None else _host(tokens, np.int32, rows, "tokens")

    def record(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
               hidden: torch.Tensor | None = None, scores: torch.Tensor | None = None) -> None:
        step = self._step
        if step is None:
            raise RuntimeError("trace recorder: record() outside begin_step()/end_step()")
        if layer != step["layer"]:
            raise ValueError(f"trace recorder: expected MoE layer {step['layer']}, got {layer} (record layers in order)")
        rows = step["rows"]
        if top_k_index.shape[0] != rows or top_k_weights.shape != top_k_index.shape:
            raise ValueError(f"trace recorder: layer {layer} routing is {tuple(top_k_index.shape)}, "
                             f"expected [{rows}, K] for index and weights")
        step["layer"] += 1
        if step["skip"]:
            return
        step["experts"].append(_host(top_k_index, np.int16, rows, "top_k_index"))
        step["weights"].append(_host(top_k_weights.float(), np.float16, rows, "top_k_weights"))
        if self.record_hidden:
            if hidden is None:
                raise ValueError("trace recorder: record_hidden=True but no hidden state was given")
            step["hidden"].append(_host(hidden.float(), np.float16, rows, "hidden"))
        if scores is not None:
            step["scores"].append(_host(scores.float(), np.float32, rows, "scores"))

    def end_step(self) -> None:
        step = self._step
        if step is None:
            raise RuntimeError("trace recorder: end_step() without begin_step()")
        self._step = None
        layers = step["layer"]
        if self.num_layers is None:
            self.num_layers = layers
        if layers != self.num_layers:
            raise ValueError(f"trace recorder: step recorded {layers} MoE layers, expected {self.num_layers}")
        if step["skip"]:
            self.dropped_steps += 1
            self.steps += 1
            return
        rows = step["rows"]
        has_tokens = step["tokens"] is not None
        if self._has_tokens is None:
            self._has_tokens = has_tokens
        elif self._has_tokens != has_tokens:
            raise ValueError("trace recorder: give tokens on every step or on none")
        c = self._chunks
        has_scores = bool(step["scores"])
        if has_scores and len(step["scores"]) != layers:
            raise ValueError("trace recorder: router scores given for some MoE layers of a step but not all")
        if self._has_scores is None:
            self._has_scores = has_scores
        elif self._has_scores != has_scores:
            raise ValueError("trace recorder: give router scores on every step or on none")
        c["experts"].append(np.stack(step["experts"], axis=1))  # [T, L, K]
        c["weights"].append(np.stack(step["weights"], axis=1))
        if self.record_hidden:
            c["hidden"].append(np.stack(step["hidden"], axis=1))  # [T, L, H]
        if has_scores:
            c["scores"].append(np.stack(step["scores"], axis=1))  # [T, L, E]
        for name in ("request", "position", "phase"):
            c[name].append(step[name])
        if has_tokens:
            c["tokens"].append(step["tokens"])
        c["step"].append(np.full((rows,), self.steps, dtype=np.int32))
        self.rows += rows
        self.steps += 1

    # -- output ---------------------------------------------------------------------------
    def to_trace(self) -> Trace:
        c = self._chunks
        layers = self.num_layers or 1
        k = int(self.meta["top_k"])

        def cat(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
            return np.concatenate(c[name]) if c[name] else np.zeros(shape, dtype=dtype)

        return Trace(
            experts=cat("experts", (0, layers, k), np.int16),
            weights=cat("weights", (0, layers, k), np.float16),
            request=cat("request", (0,), np.int32),
            position=cat("position", (0,), np.int32),
            phase=cat("phase", (0,), np.int8),
            tokens=cat("tokens", (0,), np.int32) if self._has_tokens else None,
            hidden=np.concatenate(c["hidden"]) if c["hidden"] else None,
            step=cat("step", (0,), np.int32),
            scores=np.concatenate(c["scores"]) if c["scores"] else None,
            meta=dict(self.meta),
        )

    def flush(self) -> None:
        """Write everything recorded so far (the file is replaced atomically)."""
        save_trace(self.path, self.to_trace())

    def close(self) -> None:
        if self.closed:
            return
        self.flush()
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
