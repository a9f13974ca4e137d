"""Training and evaluation of predictors on routing arrays (no trace files here).

Design: everything works on the arrays a trace holds (``experts [N, L, K]``,
``request [N]``, optionally ``phase [N]``, ``hidden [N, L, H]`` and
``tokens [N]``), so the offline tooling in traces/ and server/ can feed it
without this package knowing any file format.

Training is minibatch Adam over every (row, source layer, distance) of a batch
of rows at once: one embedding-bag and a few batched matrix products per
batch. The last ``validation`` share of the training requests is held back;
after each epoch its loss decides early stopping (``patience`` epochs without
improvement) and the best epoch's weights are restored. Same seed, same data:
the same weights.

Every predictor is scored the same way: for each row, source layer l and
distance d, its K best guesses for layer l+d are compared with the K experts
that layer really used (micro-averaged over all scored pairs):

    precision = |pred & true| / |pred|,  recall = |pred & true| / |true|,

and the *wasted share* at the copy threshold: of the guesses whose probability
is at least ``COPY_THRESHOLD``, the share the target layer did not use. The
planner copies a guess when ``p * g - (1 - p) * (rho + delta) > 0``
(prefetch/planner.py); on a saturated link (occupancy rho = 1), with copies that
land in time (g = 1) and no eviction damage (delta = 0), that is p > 1/2. (On an
idle link every guess is copied: its wasted share is 1 - precision.) ``p`` is
the predictor's probability, what the planner's per-decile calibration
converges to for a calibrated predictor; ``covered`` is the share of the used
experts those copies bring.

The two baselines are computed by the same code: ``prev`` (the experts the
previous token of the request used at layer l+d, probability 1) and ``freq``
(the K most frequent experts of layer l+d in the training split, probability
their share of tokens).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import numpy as np
import torch

from prefetch.learned import LearnedModel, gather_lags, history_rows, previous_rows, token_index

# An array predictor: (experts, request, distance, phase=, hidden=) -> (guesses [N, L-d, W] (-1: no guess),
# probabilities [N, L-d, W]).
ArrayPredictor = Callable[..., tuple[np.ndarray, np.ndarray]]
COPY_THRESHOLD = 0.5
MIN_STEPS = 16  # optimizer steps per epoch, however few the training rows
# Token ids the token part keeps counts for, the most frequent first: at most TOKEN_VOCAB, and no
# more counts ([ids, layers, experts] floats) than TOKEN_COUNTS_MAX, so the predictor file stays
# under 32 MiB for any model shape.
TOKEN_VOCAB = 16384
TOKEN_COUNTS_MAX = 1 << 23


def default_token_vocab(num_layers: int, num_experts: int) -> int:
    """``TOKEN_VOCAB``, fewer for models with many (layer, expert) pairs (at least 256)."""
    return max(256, min(TOKEN_VOCAB, TOKEN_COUNTS_MAX // max(1, num_layers * num_experts)))


def kept_token_ids(tokens: np.ndarray, most: int) -> np.ndarray:
    """The ``most`` most frequent ids among ``tokens`` (ties: the smaller id), sorted; -1s ignored."""
    ids, counts = np.unique(np.asarray(tokens, dtype=np.int64), return_counts=True)
    counts, ids = counts[ids >= 0], ids[ids >= 0]
    order = np.lexsort((ids, -counts))[:most]
    return np.sort(ids[order])


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


def decode_rows(phase: np.ndarray | None, n: int) -> np.ndarray:
    """The rows worth scoring: decode rows when there are any (prefill touches nearly every expert)."""
    if phase is not None and (np.asarray(phase) == 1).any():
        return np.asarray(phase) == 1
    return np.ones(n, dtype=bool)


class _Rows:
    """Training arrays and the row indices of each row's history, cut into multi-hot minibatches."""

    def __init__(self, model: LearnedModel, experts, lag_rows, hidden, rows: np.ndarray,
                 tok_rows: np.ndarray | None = None, request: np.ndarray | None = None) -> None:
        """``request`` given: these rows are in the model's token counts, and each row's feature
        leaves out every row of its own request with its token (``_RequestTokens``)."""
        self.model, self.experts, self.lag_rows, self.hidden, self.rows = model, experts, lag_rows, hidden, rows
        self.tok_rows = tok_rows  # [N] every row's row of the token tables (-1: none), or None
        self.groups = None if tok_rows is None or request is None else _RequestTokens(request, tok_rows, rows)

    def batch(self, rows: np.ndarray):
        h = None if self.hidden is None else torch.from_numpy(np.asarray(self.hidden[rows], dtype=np.float32))
        tok = None if self.tok_rows is None else torch.from_numpy(self.tok_rows[rows])
        hot = self.model.multi_hot
        cur = hot(self.experts[rows])
        feat = None
        if tok is not None:
            own = own_rows = None
            if self.groups is not None:
                own, own_rows = self.groups.routing(self.model, self.experts, rows)
            feat = self.model.token_feature(tok, own, own_rows)
        return cur, hot(gather_lags(self.experts, self.lag_rows[rows])), h, tok, feat


class _RequestTokens:
    """The rows of each (request, token) among the counted rows, to take out of a row's counts.

    Leaving out only the row itself would let a rare token's other rows in the same request (same
    topic, same context) vouch for its counts in training, while at serving time the counts of a
    rare token come from other requests: the scales would learn to trust them too much.
    """

    def __init__(self, request: np.ndarray, tok_rows: np.ndarray, rows: np.ndarray) -> None:
        n = len(tok_rows)
        key = np.full(n, -1, dtype=np.int64)
        known = rows[tok_rows[rows] >= 0]
        if len(known):
            pairs = np.stack([np.asarray(request)[known].astype(np.int64), tok_rows[known]], 1)
            _, group = np.unique(pairs, axis=0, return_inverse=True)
            key[known] = group.reshape(-1)
        self.group = key  # [N] group of each counted row (-1: not counted, or no id)
        order = known[np.argsort(key[known], kind="stable")]
        self.members = order  # counted rows sorted by group
        self.starts = np.searchsorted(key[order], np.arange(int(key.max()) + 2))  # [G + 1]

    def routing(self, model: LearnedModel, experts: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed multi-hot routing [B, L, E] and row counts [B] of each row's group (zeros: none)."""
        g = self.group[rows]
        ug, inverse = np.unique(g[g >= 0], return_inverse=True)
        own = torch.zeros(len(rows), model.num_layers, model.num_experts)
        own_rows = torch.zeros(len(rows))
        if len(ug) == 0:
            return own, own_rows
        lo, hi = self.starts[ug], self.starts[ug + 1]
        seg = np.repeat(np.arange(len(ug)), hi - lo)
        members = self.members[np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])]
        per_group = torch.zeros(len(ug), model.num_layers, model.num_experts)
        per_group.index_add_(0, torch.from_numpy(seg), model.multi_hot(experts[members]))
        has = np.flatnonzero(g >= 0)
        own[has] = per_group[inverse]
        own_rows[has] = torch.from_numpy((hi - lo)[inverse].astype(np.float32))
        return own, own_rows


def _loss(model: LearnedModel, cur, lags, hidden, tok=None, feat=None, weights: np.ndarray | None = None
          ) -> torch.Tensor:
    """Mean soft cross-entropy over every (row, source layer, distance) against the K-hot truth / K."""
    num_layers, top_k = model.num_layers, model.top_k
    path = model.path_hidden(cur, lags) if model.width else None
    loss = torch.zeros(())
    for d in range(1, model.lookahead + 1):
        h = None if hidden is None else hidden[:, : num_layers - d]
        logits = model.logits(cur, lags, d, h, path, tokfeat=feat)  # [B, L-d, E]
        target = cur[:, d:] / top_k
        per_row = -(target * logits.log_softmax(-1)).sum(-1).mean(-1)  # [B]
        if weights is None:
            loss = loss + per_row.mean()
        else:
            loss = loss + (per_row * torch.from_numpy(weights)).sum()
    return loss / model.lookahead


def _count_tokens(model: LearnedModel, experts: np.ndarray, tok_rows: np.ndarray) -> None:
    """The model's token counts from these rows (rows without a kept id, -1, are skipped)."""
    known = tok_rows >= 0
    counts = torch.zeros_like(model.token_counts)
    counts.index_add_(0, torch.from_numpy(tok_rows[known]), model.multi_hot(experts[known]))
    model.token_counts.copy_(counts)
    model.token_rows.copy_(torch.from_numpy(np.bincount(tok_rows[known], minlength=model.token_vocab)
                                            .astype(np.float32)))


@torch.no_grad()
def _validation_loss(model: LearnedModel, data: _Rows, batch_rows: int) -> float:
    rows = data.rows
    total = 0.0
    for s in range(0, len(rows), batch_rows):
        part = rows[s:s + batch_rows]
        total += float(_loss(model, *data.batch(part), np.full(len(part), 1.0 / len(rows))))
    return total


def train_learned(
    experts: np.ndarray,
    request: np.ndarray,
    num_experts: int,
    lookahead: int,
    *,
    width: int = 128,
    history: int = 4,
    epochs: int = 20,
    patience: int = 2,
    validation: float = 0.1,
    lr: float = 0.03,
    batch_rows: int = 2048,
    weight_decay: float = 0.0,
    seed: int = 0,
    phase: np.ndarray | None = None,
    hidden: np.ndarray | None = None,
    tokens: np.ndarray | None = None,
    token_vocab: int | None = None,
    progress: Callable[[dict], None] | None = None,
) -> LearnedModel:
    """Fit the ``learned`` predictor on the rows given (split off held-out rows before calling).

    The last ``validation`` share of these requests is held back for early
    stopping (0, or a single request: every epoch runs and the last one is
    kept). Minibatches are ``batch_rows`` rows, smaller on a small trace so that
    an epoch is at least ``MIN_STEPS`` steps. ``width`` 0 and ``history`` 1 is
    the direct part alone. ``tokens`` [N] are the rows' input token ids: with
    them the model gets a token part with counts for the ``token_vocab`` most
    frequent ids (None: ``default_token_vocab``; 0: ids not used).
    ``progress`` receives ``{"epoch", "epochs", "loss", "val_loss", "val_f1",
    "best_epoch", "seconds"}`` after each epoch (the val fields are None
    without a validation split); ``model.meta["fit"]`` records the epochs run
    and the best one.
    """
    experts = np.asarray(experts, dtype=np.int64)
    n, num_layers, top_k = experts.shape
    if n == 0:
        raise ValueError("no training rows")
    if experts.max() >= num_experts or experts.min() < 0:
        raise ValueError(f"expert ids must be in [0, {num_experts}), got [{experts.min()}, {experts.max()}]")
    request = np.asarray(request)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    held = holdout_split(request, validation) if validation > 0 and len(np.unique(request)) > 1 \
        else np.zeros(n, dtype=bool)
    fit = np.flatnonzero(~held)
    lag_rows = history_rows(request, phase, history)  # requests never straddle the split
    hidden_size = 0 if hidden is None else int(hidden.shape[-1])
    if tokens is not None and len(tokens) != n:
        raise ValueError(f"tokens has {len(tokens)} rows, experts {n}")
    if token_vocab is None:
        token_vocab = default_token_vocab(num_layers, num_experts)
    kept = kept_token_ids(tokens, token_vocab) if tokens is not None and token_vocab > 0 else np.zeros(0, np.int64)
    model = LearnedModel(num_layers, num_experts, top_k, lookahead, hidden_size, width, history, len(kept))
    tok_rows = None
    if len(kept):
        model.token_ids.copy_(torch.from_numpy(kept))
        tok_rows = token_index(kept, tokens)
    train = _Rows(model, experts, lag_rows, hidden, fit, tok_rows, request=request)
    val = _Rows(model, experts, lag_rows, hidden, np.flatnonzero(held), tok_rows)
    with torch.no_grad():
        model.freq.copy_(torch.from_numpy(routing_shares(experts, num_experts)))  # the baseline's shares
        # Start from the layer's marginal distribution: the model then learns only what the features add.
        log_freq = torch.log(torch.from_numpy(routing_shares(experts[fit], num_experts)) + 1e-4)  # [L, E]
        for d in range(1, lookahead + 1):
            model.weight[d - 1, : num_layers - d, -1] = log_freq[d:]
        if hidden_size:
            h = torch.from_numpy(np.asarray(hidden[fit[: 4096]], dtype=np.float32))  # [n', L, H]
            model.hidden_mean.copy_(h.mean(0))
            model.hidden_std.copy_(h.std(0).clamp_min(1e-3))
            torch.nn.init.normal_(model.hidden_weight, std=0.01 / hidden_size**0.5, generator=gen)
        if width:
            # Each bag sums about K * (layers) rows: unit-scale inputs to the hidden units.
            for name, rows in (("path_cur", top_k), ("path_last", top_k), ("path_prev", top_k * num_layers),
                               ("path_hist", top_k * num_layers)):
                torch.nn.init.normal_(getattr(model, name), std=rows**-0.5, generator=gen)
        if model.token_vocab:
            _count_tokens(model, experts[fit], tok_rows[fit])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    # A small trace still gets MIN_STEPS optimizer steps per epoch (batches of at least 64 rows).
    batch = min(batch_rows, max(64, -(-len(fit) // MIN_STEPS)))
    best, best_loss, best_epoch, epoch = None, float("inf"), 0, 0
    for epoch in range(1, epochs + 1):
        t0, total = time.perf_counter(), 0.0
        model.train()
        perm = rng.permutation(fit)
        for s in range(0, len(perm), batch):
            rows = np.sort(perm[s:s + batch])
            loss = _loss(model, *train.batch(rows))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(rows)
        model.eval()
        info = {"epoch": epoch, "epochs": epochs, "loss": total / len(fit), "val_loss": None, "val_f1": None}
        if len(val.rows):
            info["val_loss"] = _validation_loss(model, val, 4 * batch_rows)
            val_phase = None if phase is None else phase[held]
            info["val_f1"] = evaluate(model, experts[held], request[held], 1, phase=val_phase,
                                      hidden=None if hidden is None else hidden[held],
                                      tokens=None if tokens is None else tokens[held],
                                      rows=decode_rows(val_phase, len(val.rows)))[1]["f1"]
            if info["val_loss"] < best_loss:
                best_loss, best_epoch = info["val_loss"], epoch
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            best_epoch = epoch
        info.update(best_epoch=best_epoch, seconds=time.perf_counter() - t0)
        if progress is not None:
            progress(info)
        if epoch - best_epoch >= patience:
            break
    if best is not None:
        model.load_state_dict(best)
    if model.token_vocab:  # served with every training row's counts, the validation rows' too
        with torch.no_grad():
            _count_tokens(model, experts, tok_rows)
    model.meta["fit"] = {"epochs_run": epoch, "best_epoch": best_epoch, "validation_rows": int(held.sum()),
                         "val_loss": None if best is None else best_loss}
    return model.eval()


# -- baselines -------------------------------------------------------------------------
def prev_baseline(experts: np.ndarray, request: np.ndarray, distance: int, *, phase=None,
                  **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Guess that layer l+d routes like it did for the previous token of the request (probability 1)."""
    guess = previous_rows(experts, request, phase)[:, distance:]
    return guess, (guess >= 0).astype(np.float32)


def freq_baseline(shares: np.ndarray) -> ArrayPredictor:
    """Guess layer l+d's K most frequent experts (``shares [L, E]`` from the training split)."""
    shares = np.asarray(shares)

    def guess(experts: np.ndarray, request: np.ndarray, distance: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        n, num_layers, top_k = np.shape(experts)
        top = np.argsort(-shares, axis=1, kind="stable")[:, :top_k]  # [L, K]
        prob = np.take_along_axis(shares, top, axis=1)
        shape = (n, num_layers - distance, top_k)
        return np.broadcast_to(top[distance:][None], shape), np.broadcast_to(prob[distance:][None], shape)

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
    threshold: float = COPY_THRESHOLD,
    tokens: np.ndarray | None = None,
) -> dict[int, dict[str, float]]:
    """Precision, recall, F1, and wasted share and coverage at ``threshold``, per distance d = 1..lookahead.

    ``predictor_or_fn`` is a :class:`LearnedModel`, an array predictor
    ``fn(experts, request, d, phase=, hidden=) -> (guesses [N, L-d, W], probs)``,
    or a live :class:`~prefetch.base.Predictor` (driven one row per forward, its
    K best guesses per target layer scored, probability = score * d). ``rows``
    (bool [N]) limits which rows are scored; every row still feeds the history.
    ``tokens`` [N] are the rows' token ids, for predictors that read them.
    """
    experts = np.asarray(experts, dtype=np.int64)
    n, num_layers, _top_k = experts.shape
    lookahead = min(int(lookahead), num_layers - 1)
    if hasattr(predictor_or_fn, "observe") and hasattr(predictor_or_fn, "predict"):
        guesses = _stream(predictor_or_fn, experts, request, lookahead, hidden, tokens)
        fn = lambda e, r, d, **kw: guesses[d]
    elif hasattr(predictor_or_fn, "predict_array"):
        fn = functools.partial(predictor_or_fn.predict_array, tokens=tokens)
    else:
        fn = predictor_or_fn
    scored = np.ones(n, dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    out: dict[int, dict[str, float]] = {}
    for d in range(1, lookahead + 1):
        pred, prob = fn(experts, request, d, phase=phase, hidden=hidden)
        pred, prob = np.asarray(pred)[scored], np.asarray(prob)[scored]  # [n', L-d, W]
        true = experts[scored, d:]  # [n', L-d, K]
        valid = pred >= 0
        hit = (pred[..., :, None] == true[..., None, :]).any(-1) & valid
        copied = valid & (prob >= threshold)
        n_hit, n_pred, n_true, n_copied = int(hit.sum()), int(valid.sum()), int(true.size), int(copied.sum())
        precision = n_hit / n_pred if n_pred else 0.0
        recall = n_hit / n_true if n_true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        useful = int((hit & copied).sum())
        out[d] = {"precision": precision, "recall": recall, "f1": f1,
                  "wasted": 1.0 - useful / n_copied if n_copied else 0.0,
                  "covered": useful / n_true if n_true else 0.0}
    return out


def compare(model: LearnedModel, experts: np.ndarray, request: np.ndarray, lookahead: int, *,
            phase=None, hidden=None, rows=None, tokens=None) -> dict[str, dict[int, dict[str, float]]]:
    """The learned model beside both baselines (freq from the model's training split), same rows."""
    kw = {"phase": phase, "hidden": hidden, "rows": rows}
    return {
        "learned": evaluate(model, experts, request, lookahead, tokens=tokens, **kw),
        "prev": evaluate(prev_baseline, experts, request, lookahead, **kw),
        "freq": evaluate(freq_baseline(model.freq.numpy()), experts, request, lookahead, **kw),
    }


def _stream(predictor, experts: np.ndarray, request: np.ndarray, lookahead: int,
            hidden: np.ndarray | None, tokens: np.ndarray | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Drive a live predictor over the rows; its K best guesses per (row, layer, distance), with probabilities."""
    n, num_layers, top_k = experts.shape
    guesses = {d: (np.full((n, num_layers - d, top_k), -1, dtype=np.int64),
                   np.zeros((n, num_layers - d, top_k), dtype=np.float32)) for d in range(1, lookahead + 1)}
    request = np.asarray(request)
    for i in range(n):
        if i == 0 or request[i] != request[i - 1]:
            predictor.begin_request()
        predictor.reset()
        if tokens is not None and hasattr(predictor, "observe_tokens"):
            predictor.observe_tokens(tokens[i:i + 1])
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
                best = sorted(cands, key=lambda c: -c[0])[:top_k]
                guesses[d][0][i, layer, : len(best)] = [e for _, e in best]
                guesses[d][1][i, layer, : len(best)] = [s * d for s, _ in best]
    return guesses
