"""The routing-trace file: one safetensors file, arrays plus JSON metadata in its header.

Arrays (N rows = tokens, L = MoE layers, K = top-k, H = hidden size):

    experts  [N, L, K] int16     routed expert ids, router order
    weights  [N, L, K] float16   routing weights
    request  [N] int32           request id of the row
    position [N] int32           token position in its request
    phase    [N] int8            0 prefill, 1 decode
    tokens   [N] int32           optional: token id
    hidden   [N, L, H] float16   optional: the MoE layer's input (predictor training)
    step     [N] int32           optional: engine forward pass the row came from
    scores   [N, L, E] float32   optional: router probabilities (recorded with cache-aware routing;
                                 float32 so a replay substitutes exactly as the live engine did)

Header metadata: every value is JSON-encoded (safetensors allows only strings);
``experts`` and ``top_k`` are required, ``model``, ``architecture`` and
``moe_layers`` are written by the engine. The reader validates everything and
raises :class:`TraceFormatError` (a user error) with one clear line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import MoepagerError

FORMAT = "moepager-trace/1"
REQUIRED = ("experts", "weights", "request", "position", "phase")
OPTIONAL = ("tokens", "hidden", "step", "scores")
DTYPES = {
    "experts": np.int16,
    "weights": np.float16,
    "request": np.int32,
    "position": np.int32,
    "phase": np.int8,
    "tokens": np.int32,
    "hidden": np.float16,
    "step": np.int32,
    "scores": np.float32,
}


class TraceFormatError(MoepagerError):
    """A trace file that cannot be read, with the reason."""


@dataclass
class Trace:
    experts: np.ndarray  # [N, L, K]
    weights: np.ndarray  # [N, L, K]
    request: np.ndarray  # [N]
    position: np.ndarray  # [N]
    phase: np.ndarray  # [N]
    meta: dict[str, Any] = field(default_factory=dict)
    tokens: np.ndarray | None = None  # [N]
    hidden: np.ndarray | None = None  # [N, L, H]
    step: np.ndarray | None = None  # [N]
    scores: np.ndarray | None = None  # [N, L, E]

    @property
    def num_rows(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def num_experts(self) -> int:
        return int(self.meta["experts"])

    def validate(self, where: str = "trace") -> None:
        if self.experts.ndim != 3:
            raise TraceFormatError(f"{where}: 'experts' must be [N, L, K], got shape {self.experts.shape}")
        n, layers, k = self.experts.shape
        if layers < 1 or k < 1:
            raise TraceFormatError(f"{where}: 'experts' has an empty layer or top-k axis: {self.experts.shape}")
        if self.weights.shape != self.experts.shape:
            raise TraceFormatError(f"{where}: 'weights' shape {self.weights.shape} != 'experts' {self.experts.shape}")
        for name in ("request", "position", "phase", "tokens", "step"):
            arr = getattr(self, name)
            if arr is not None and arr.shape != (n,):
                raise TraceFormatError(f"{where}: {name!r} must be [N={n}], got shape {arr.shape}")
        if self.hidden is not None and (self.hidden.ndim != 3 or self.hidden.shape[:2] != (n, layers)):
            raise TraceFormatError(f"{where}: 'hidden' must be [N={n}, L={layers}, H], got {self.hidden.shape}")
        for key in ("experts", "top_k"):
            if key not in self.meta:
                raise TraceFormatError(f"{where}: metadata lacks {key!r}")
        num_experts = int(self.meta["experts"])
        if self.scores is not None and self.scores.shape != (n, layers, num_experts):
            raise TraceFormatError(f"{where}: 'scores' must be [N={n}, L={layers}, E={num_experts}], "
                                   f"got {self.scores.shape}")
        if int(self.meta["top_k"]) != k:
            raise TraceFormatError(f"{where}: metadata top_k={self.meta['top_k']} but 'experts' has K={k}")
        if n and (int(self.experts.min()) < 0 or int(self.experts.max()) >= num_experts):
            raise TraceFormatError(f"{where}: expert ids must be in [0, {num_experts}), "
                                   f"found {int(self.experts.min())}..{int(self.experts.max())}")
        if n and not np.isin(self.phase, (0, 1)).all():
            raise TraceFormatError(f"{where}: 'phase' must be 0 (prefill) or 1 (decode)")
        if self.step is not None and n and (np.diff(self.step.astype(np.int64)) < 0).any():
            raise TraceFormatError(f"{where}: 'step' must be non-decreasing")
        moe_layers = self.meta.get("moe_layers")
        if moe_layers is not None and len(moe_layers) != layers:
            raise TraceFormatError(f"{where}: metadata lists {len(moe_layers)} MoE layers but 'experts' has L={layers}")


def save_trace(path: str | os.PathLike, trace: Trace) -> None:
    """Validate and write ``trace`` (arrays cast to the file's dtypes)."""
    from safetensors.numpy import save_file

    trace.validate(str(path))
    tensors = {}
    for name in REQUIRED + OPTIONAL:
        arr = getattr(trace, name)
        if arr is not None:
            tensors[name] = np.ascontiguousarray(np.asarray(arr).astype(DTYPES[name], copy=False))
    header = {key: json.dumps(value) for key, value in trace.meta.items()}
    header["format"] = json.dumps(FORMAT)
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata=header)
    os.replace(tmp, path)


def load_trace(path: str | os.PathLike, *, hidden: bool = True) -> Trace:
    """Read and validate a trace file; ``hidden=False`` skips the (large) hidden states."""
    from safetensors import safe_open

    where = os.fspath(path)
    if not os.path.isfile(where):
        raise FileNotFoundError(f"trace file not found: {where}")
    try:
        with safe_open(where, framework="np") as f:
            header = f.metadata() or {}
            names = set(f.keys())
            missing = [n for n in REQUIRED if n not in names]
            if missing:
                raise TraceFormatError(f"{where}: not a moepager trace (missing {', '.join(missing)})")
            arrays = {n: f.get_tensor(n) for n in REQUIRED + OPTIONAL
                      if n in names and (hidden or n != "hidden")}
    except TraceFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for corrupt headers
        raise TraceFormatError(f"{where}: not a readable safetensors trace ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    meta: dict[str, Any] = {}
    for key, value in header.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    fmt = meta.pop("format", FORMAT)
    if fmt != FORMAT:
        raise TraceFormatError(f"{where}: unsupported trace format {fmt!r} (this build reads {FORMAT})")
    for name, arr in arrays.items():
        want = DTYPES[name]
        if arr.dtype != want:
            raise TraceFormatError(f"{where}: {name!r} must be {np.dtype(want).name}, got {arr.dtype}")
    trace = Trace(meta=meta, **arrays)
    trace.validate(where)
    return trace
