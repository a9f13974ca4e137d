"""Statistics of a routing trace: what a cache and a predictor can hope to exploit.

- frequency entropy per layer (bits, and normalised by log2 E: 1.0 = uniform);
- reuse distance: tokens between consecutive uses of an expert in a layer,
  within a request (a histogram in powers of two, and the median);
- consecutive-token overlap: the share of a token's experts the previous token
  of the same request also used, beside two baselines: independent uniform
  top-k draws (K / E) and independent draws with the layer's own expert
  frequencies (sum_e pi_e^2 / K, pi_e the per-token inclusion probability);
- cross-layer co-activation: how well layer l's experts predict layer l+1's, as
  the precision of the K most co-activated next-layer experts (in-sample),
  against the K / E chance level.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from traces.format import Trace

REUSE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def frequency_entropy(trace: Trace) -> list[dict[str, float]]:
    e = trace.num_experts
    out = []
    for layer in range(trace.num_layers):
        counts = np.bincount(trace.experts[:, layer].ravel().astype(np.int64), minlength=e).astype(np.float64)
        p = counts / max(counts.sum(), 1.0)
        nz = p[p > 0]
        h = float(-(nz * np.log2(nz)).sum())
        out.append({"entropy_bits": h, "normalized": h / np.log2(e) if e > 1 else 0.0})
    return out


def _same_request_pairs(trace: Trace) -> np.ndarray:
    """Row indices i such that row i-1 is the previous token of the same request."""
    if trace.num_rows < 2:
        return np.zeros(0, dtype=np.int64)
    same = trace.request[1:] == trace.request[:-1]
    return np.flatnonzero(same) + 1


def consecutive_overlap(trace: Trace) -> list[dict[str, float]]:
    k, e = trace.top_k, trace.num_experts
    rows = _same_request_pairs(trace)
    out = []
    for layer in range(trace.num_layers):
        cur = trace.experts[:, layer].astype(np.int64)  # [N, K]
        counts = np.zeros(e)
        for j in range(k):
            counts += np.bincount(cur[:, j], minlength=e)
        pi = counts / max(trace.num_rows, 1)  # per-token inclusion probability
        if len(rows):
            a, b = cur[rows], cur[rows - 1]
            shared = (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1)
            observed = float(shared.mean() / k)
        else:
            observed = float("nan")
        out.append({"observed": observed, "random_uniform": k / e,
                    "independent_same_frequency": float((pi ** 2).sum() / k)})
    return out


def reuse_distance(trace: Trace) -> dict[str, Any]:
    """Token gaps between consecutive uses of an expert (same layer, same request)."""
    gaps_all = []
    for layer in range(trace.num_layers):
        last: dict[tuple[int, int], int] = {}
        for row, (req, ex) in enumerate(zip(trace.request.tolist(), trace.experts[:, layer].tolist())):
            for expert in set(ex):
                key = (req, expert)
                prev = last.get(key)
                if prev is not None:
                    gaps_all.append(row - prev)
                last[key] = row
    gaps = np.asarray(gaps_all, dtype=np.int64)
    hist = {}
    lo = 0
    for hi in REUSE_BUCKETS:
        hist[f"<={hi}"] = int(((gaps > lo) & (gaps <= hi)).sum())
        lo = hi
    hist[f">{REUSE_BUCKETS[-1]}"] = int((gaps > REUSE_BUCKETS[-1]).sum())
    return {"count": len(gaps), "median": float(np.median(gaps)) if len(gaps) else None,
            "histogram": hist}


def co_activation(trace: Trace) -> dict[str, Any]:
    k, e = trace.top_k, trace.num_experts
    per_pair = []
    for layer in range(trace.num_layers - 1):
        a = trace.experts[:, layer].astype(np.int64)
        b = trace.experts[:, layer + 1].astype(np.int64)
        co = np.zeros((e, e))
        for i in range(k):
            for j in range(k):
                np.add.at(co, (a[:, i], b[:, j]), 1.0)
        scores = co[a].sum(axis=1)  # [N, E]: co-activation mass of each next-layer expert
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        hit = (top[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1)
        per_pair.append(float(hit.mean() / k) if len(a) else float("nan"))
    mean = float(np.mean(per_pair)) if per_pair else None
    return {"next_layer_precision": per_pair, "mean_precision": mean, "chance": k / e}


def working_set_profile(trace: Trace, window: int = 16) -> list[float]:
    """Mean number of distinct experts per layer over windows of ``window`` rows: a per-layer budget weight."""
    n = trace.num_rows
    out = []
    for layer in range(trace.num_layers):
        sizes = [len(np.unique(trace.experts[a:a + window, layer])) for a in range(0, n, window)]
        out.append(float(np.mean(sizes)) if sizes else 1.0)
    return out


def trace_stats(trace: Trace) -> dict[str, Any]:
    return {
        "rows": trace.num_rows,
        "requests": len(np.unique(trace.request)),
        "layers": trace.num_layers,
        "experts": trace.num_experts,
        "top_k": trace.top_k,
        "entropy": frequency_entropy(trace),
        "reuse_distance": reuse_distance(trace),
        "consecutive_overlap": consecutive_overlap(trace),
        "co_activation": co_activation(trace),
        "working_set": working_set_profile(trace),
    }
