"""Training and evaluation of predictors on routing arrays (no trace files here).

Design: everything works on the arrays a trace holds (``experts [N, L, K]``,
``request [N]``, optionally ``phase [N]`` and ``hidden [N, L, H]``), so the
offline tooling in traces/ and server/ can feed it without this package knowing
any file format. Every predictor is scored the same way: for each row, source
layer l and distance d, its K best guesses for layer l+d are compared with the K
experts that layer really used (micro-averaged over all scored pairs):

    precision = |pred & true| / |pred|,  recall = |pred & true| / |true|.

The two baselines are computed by the same code: ``prev`` (the experts the
previous token of the request used at layer l+d) and ``freq`` (the K most
frequent experts of layer l+d in the training split).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from prefetch.learned import LearnedModel, previous_rows

# An array predictor: (experts, request, distance, phase=, hidden=) -> guesses [N, L-d, W] (-1: no guess).
ArrayPredictor = Callable[..., np.ndarray]


def holdout_split(request: np.ndarray, holdout: float) -> np.ndarray:
    """Boolean mask [N] of held-out rows: the last ``holdout`` fraction of requests (by first appearance)."""
    request = np.asarray(request)
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    ids, first = np.unique(request, return_index=True)
    ordered = ids[np.argsort(first)]
    n_held = round(len(ordered) * holdout)
    if holdout > 0 and n_held == 0 and len(ordered) > 1:
        n_held = 1
    if n_held >= len(ordered) and holdout > 0:
        raise ValueError(f"holdout {holdout} leaves no training requests ({len(ordered)} requests in all)")
    return np.isin(request, ordered[len(ordered) - n_held:]) if n_held else np.zeros(len(request), dtype=bool)


def routing_shares(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Share of tokens that use each expert, per layer: [L, E]."""
    experts = np.asarray(experts, dtype=np.int64)
    n, layers, _ = experts.shape
    out = np.zeros((layers, num_experts), dtype=np.float32)
    for layer in range(layers):
        out[layer] = np.bincount(experts[:, layer].ravel(), minlength=num_experts)[:num_experts] / max(n, 1)
    return out


def train_learned(
    experts: np.ndarray,
    request: np.ndarray,
    num_experts: int,
    lookahead: int,
    *,
    epochs: int = 5,
    lr: float = 0.05,
    batch_rows: int = 256,
    weight_decay: float = 1e-5,
    seed: int = 0,
    phase: np.ndarray | None = None,
    hidden: np.ndarray | None = None,
    progress: Callable[[dict], None] | None = None,
) -> LearnedModel:
    """Fit the ``learned`` predictor on every row given (split off held-out rows before calling).

    ``progress`` receives ``{"epoch", "epochs", "loss", "seconds"}`` after each epoch.
    """
    experts = np.asarray(experts, dtype=np.int64)
    n, num_layers, top_k = experts.shape
    if n == 0:
        raise ValueError("no training rows")
    if experts.max() >= num_experts or experts.min() < 0:
        raise ValueError(f"expert ids must be in [0, {num_experts}), got [{experts.min()}, {experts.max()}]")
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    hidden_size = 0 if hidden is None else int(hidden.shape[-1])
    model = LearnedModel(num_layers, num_experts, top_k, lookahead, hidden_size)
    with torch.no_grad():
        model.freq.copy_(torch.from_numpy(routing_shares(experts, num_experts)))
        # Start from the layer's marginal distribution: the model then learns only what the features add.
        log_freq = torch.log(model.freq + 1e-4)  # [L, E]
        w = model.weight[:-1].view(lookahead, num_layers, model.features, num_experts)
        for d in range(1, lookahead + 1):
            w[d - 1, : num_layers - d, -1] = log_freq[d:]
        if hidden_size:
            h = torch.from_numpy(np.asarray(hidden[: min(n, 4096)], dtype=np.float32))  # [n', L, H]
            model.hidden_mean.copy_(h.mean(0))
            model.hidden_std.copy_(h.std(0).clamp_min(1e-3))
            torch.nn.init.normal_(model.hidden_weight, std=0.01 / hidden_size**0.5, generator=gen)
    prev = previous_rows(experts, request, phase)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    model.train()
    for epoch in range(epochs):
        t0, total, count = time.perf_counter(), 0.0, 0
        perm = rng.permutation(n)
        for s in range(0, n, batch_rows):
            rows = np.sort(perm[s:s + batch_rows])
            cur, prv = experts[rows], prev[rows]
            loss = torch.zeros(())
            for d in range(1, lookahead + 1):
                layers = np.arange(num_layers - d)
                h = None
                if hidden_size:
                    h = torch.from_numpy(np.asarray(hidden[rows][:, layers], dtype=np.float32))
                logits = model.logits(cur, prv, d, layers, h)  # [B, L-d, E]
                target = torch.zeros_like(logits).scatter_(-1, torch.from_numpy(cur[:, d:]), 1.0 / top_k)
                loss = loss - (target * logits.log_softmax(-1)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            (loss / lookahead).backward()
            opt.step()
            total += loss.item() * len(rows)
            count += len(rows)
        if progress is not None:
            progress({"epoch": epoch + 1, "epochs": epochs, "loss": total / count / lookahead,
                      "seconds": time.perf_counter() - t0})
    return model.eval()


# -- baselines -------------------------------------------------------------------------
def prev_baseline(experts: np.ndarray, request: np.ndarray, distance: int, *, phase=None, **kwargs) -> np.ndarray:
    """Guess that layer l+d routes like it did for the previous token of the request."""
    return previous_rows(experts, request, phase)[:, distance:]


def freq_baseline(shares: np.ndarray) -> ArrayPredictor:
    """Guess layer l+d's K most frequent experts (``shares [L, E]`` from the training split)."""
    shares = np.asarray(shares)

    def guess(experts: np.ndarray, request: np.ndarray, distance: int, **kwargs) -> np.ndarray:
        n, num_layers, top_k = np.shape(experts)
        top = np.argsort(-shares, axis=1, kind="stable")[:, :top_k]  # [L, K]
        return np.broadcast_to(top[distance:][None], (n, num_layers - distance, top_k))

    return guess


# -- evaluation ---------------------------------------------------------------------------
def evaluate(
    predictor_or_fn,
    experts: np.ndarray,
    request: np.ndarray,
    lookahead: int,
    *,
    phase: np.ndarray | None = None,
    hidden: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> dict[int, dict[str, float]]:
    """Precision, recall and F1 per distance d = 1..lookahead.

    ``predictor_or_fn`` is a :class:`LearnedModel`, an array predictor
    ``fn(experts, request, d, phase=, hidden=) -> [N, L-d, W]``, or a live
    :class:`~prefetch.base.Predictor` (driven one row per forward, its K best
    guesses per target layer scored). ``rows`` (bool [N]) limits which rows are
    scored; every row still feeds the history.
    """
    experts = np.asarray(experts, dtype=np.int64)
    n, num_layers, _top_k = experts.shape
    lookahead = min(int(lookahead), num_layers - 1)
    if hasattr(predictor_or_fn, "observe") and hasattr(predictor_or_fn, "predict"):
        guesses = _stream(predictor_or_fn, experts, request, lookahead, hidden)
        fn = lambda e, r, d, **kw: guesses[d]
    elif hasattr(predictor_or_fn, "predict_array"):
        fn = predictor_or_fn.predict_array
    else:
        fn = predictor_or_fn
    scored = np.ones(n, dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    out: dict[int, dict[str, float]] = {}
    for d in range(1, lookahead + 1):
        pred = np.asarray(fn(experts, request, d, phase=phase, hidden=hidden))[scored]  # [n', L-d, W]
        true = experts[scored, d:]  # [n', L-d, K]
        valid = pred >= 0
        hit = ((pred[..., :, None] == true[..., None, :]).any(-1) & valid).sum()
        n_pred, n_true = int(valid.sum()), int(true.size)
        precision = float(hit / n_pred) if n_pred else 0.0
        recall = float(hit / n_true) if n_true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        out[d] = {"precision": precision, "recall": recall, "f1": f1}
    return out


def compare(model: LearnedModel, experts: np.ndarray, request: np.ndarray, lookahead: int, *,
            phase=None, hidden=None, rows=None) -> dict[str, dict[int, dict[str, float]]]:
    """The learned model beside both baselines (freq from the model's training split), same rows."""
    kw = {"phase": phase, "hidden": hidden, "rows": rows}
    return {
        "learned": evaluate(model, experts, request, lookahead, **kw),
        "prev": evaluate(prev_baseline, experts, request, lookahead, **kw),
        "freq": evaluate(freq_baseline(model.freq.numpy()), experts, request, lookahead, **kw),
    }


def _stream(predictor, experts: np.ndarray, request: np.ndarray, lookahead: int,
            hidden: np.ndarray | None) -> dict[int, np.ndarray]:
    """Drive a live predictor over the rows; its K best guesses per (row, layer, distance)."""
    n, num_layers, top_k = experts.shape
    guesses = {d: np.full((n, num_layers - d, top_k), -1, dtype=np.int64) for d in range(1, lookahead + 1)}
    request = np.asarray(request)
    for i in range(n):
        if i == 0 or request[i] != request[i - 1]:
            predictor.begin_request()
        predictor.reset()
        for layer in range(num_layers):
            h = None if hidden is None else torch.from_numpy(np.asarray(hidden[i, layer:layer + 1], np.float32))
            predictor.observe(layer, h, experts[i, layer][None])
            by_target: dict[int, list[tuple[float, int]]] = {}
            for key, score in predictor.predict(layer):
                by_target.setdefault(key.layer, []).append((score, key.expert))
            for target, cands in by_target.items():
                d = target - layer
                if d > lookahead:
                    continue
                best = [e for _, e in sorted(cands, key=lambda c: -c[0])[:top_k]]
                guesses[d][i, layer, : len(best)] = best
    return guesses
