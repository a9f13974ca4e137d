"""``learned``: a small model trained on routing traces that predicts the next layers' experts.

Design: the logits of layer t = l + d's experts, predicted when source layer l
has routed, are the sum of up to three parts, all over inputs known at that moment:

- a *direct* part, one multinomial-logistic unit per (l, d) over multi-hot
  routing: the current token's experts at l and l-1 and the previous token's at
  t and t-1 (optionally plus layer l's hidden state, standardised). It carries
  the strong first-order signals: a path from layer l to t, and temporal
  locality at t. With no path part this is the whole model (``width`` 0; files
  written before the path part load as such);
- a *path* part, one hidden layer of ``width`` ReLU units per (row, source layer)
  read by an output head per (d, l). Its input is a sum of per-layer embedding
  bags: the current token's experts at every layer <= l (scaled by
  1/sqrt(l+1), so the scale does not grow along the stack), layer l's again
  (its own table, so the latest layer can interact with the path), every layer
  of the previous token, and the mean of every layer of the ``history - 1``
  tokens before it. That is where cross-layer paths, request topics and
  drift beyond one token show up;
- a *token* part (with ``token_vocab``, when the traces carry token ids):
  ``scale[d, l] * (log P(expert at t | the token) - log P(expert at t))`` from
  counts over the training rows, kept for the ``token_vocab`` most frequent
  ids (each smoothed towards the layer's shares by one row; other ids add
  nothing: a shared, hashed table would blur frequent tokens with rare ones). The
  input token is known when its step starts, and which experts a token routes
  to depends strongly on the token itself: on the embedded model's held-out
  requests the id alone names 0.66-0.80 of a layer's experts in its top K. In
  training, each row's own request is left out of its counts, so the scales
  (which start at 0) learn what the counts are worth in requests they have not
  seen; where ids carry no signal they stay near 0.

Both parts are sums of table rows picked by expert ids (embedding bags). Live
prediction at T=1 gathers those rows in numpy (tens of microseconds per layer,
every target layer at once, one [width] x [width, E] product per target);
training multiplies multi-hot inputs by the tables instead, a few batched
matrix products per minibatch. The model is trained with a softmax
cross-entropy against the true K-hot target, so ``K * softmax`` estimates the
chance that a token uses an expert.

History ("lag m" = the m-th previous token of the request): prefill rows have
none (live, a prefill forward reaches layer l before the previous prompt
token's later layers have routed); a decode row's lags are the request's
previous rows, whatever their phase, as the live predictor sees them when the
prompt was one forward.

File format (safetensors): ``weight [D, L, 4E+1, E]`` (the direct part; last
row the bias), ``freq [L, E]`` (training-split routing shares, for the
baseline); with hidden states ``hidden_weight [D, L, H, E]``, ``hidden_mean``
and ``hidden_std [L, H]``; with a path part ``path_cur``, ``path_last``,
``path_prev``, ``path_hist [L, E, W]``, ``path_bias [L, W]`` and
``head [D, L, W, E]``; with a token part ``token_ids [V]`` (sorted),
``token_counts [V, L, E]``, ``token_rows [V]`` and ``token_scale [D, L]``. Header metadata:
``format`` = ``moepager.predictor``, ``kind`` = ``learned``, ``config`` (JSON:
num_layers, num_experts, top_k, lookahead, hidden_size, width, history,
token_vocab, features) and free JSON fields such as ``heldout`` and ``train``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cache.base import ExpertKey
from prefetch.base import index_array, register_predictor, scored_top, target_layers

FORMAT = "moepager.predictor"
FEATURES = "direct:cur[l],cur[l-1],prev[l+d],prev[l+d-1],bias;path:cur[<=l],cur[l],prev[*],hist[*]"
DIRECT_ONLY = "cur[l],cur[l-1],prev[l+d],prev[l+d-1],bias"  # files written before the path part
TOKEN_FEATURES = FEATURES + ";token:counts[id]"  # with the token part
PATH_TABLES = ("path_cur", "path_last", "path_prev", "path_hist")
TOKEN_TABLES = ("token_ids", "token_counts", "token_rows", "token_scale")
# Guesses per routed expert and target layer. More than one: the runners-up after the top K still
# carry much of the probability (on the embedded model's traces the top 4 of 32 experts hold 70 % of
# the next layer's, the top 8 89 %), and the planner weighs each guess against the link and the
# slot it would take, so the longer list is copied only where the link has idle time.
CANDIDATES = 2


def token_index(ids: np.ndarray, tokens: np.ndarray | None) -> np.ndarray | None:
    """Each token's row in the sorted kept ``ids`` [V] (-1: not kept, or no id), or None without tokens."""
    if tokens is None or len(ids) == 0:
        return None
    tokens = np.asarray(tokens, dtype=np.int64)
    at = np.minimum(np.searchsorted(ids, tokens), len(ids) - 1)
    return np.where((ids[at] == tokens) & (tokens >= 0), at, -1)


class LearnedModel(torch.nn.Module):
    def __init__(self, num_layers: int, num_experts: int, top_k: int, lookahead: int, hidden_size: int = 0,
                 width: int = 0, history: int = 1, token_vocab: int = 0) -> None:
        super().__init__()
        if lookahead < 1 or lookahead >= num_layers:
            raise ValueError(f"lookahead must be in 1..{num_layers - 1} for {num_layers} MoE layers, got {lookahead}")
        if width < 0 or history < 1:
            raise ValueError(f"need width >= 0 and history >= 1, got width={width}, history={history}")
        if token_vocab < 0:
            raise ValueError(f"token_vocab must be >= 0, got {token_vocab}")
        self.num_layers, self.num_experts, self.top_k = int(num_layers), int(num_experts), int(top_k)
        self.lookahead, self.hidden_size = int(lookahead), int(hidden_size)
        self.width, self.history, self.token_vocab = int(width), int(history), int(token_vocab)
        L, E, W = self.num_layers, self.num_experts, self.width
        self.features = 4 * E + 1
        self.weight = torch.nn.Parameter(torch.zeros(self.lookahead, L, self.features, E))
        if self.hidden_size:
            self.hidden_weight = torch.nn.Parameter(torch.zeros(self.lookahead, L, self.hidden_size, E))
            self.register_buffer("hidden_mean", torch.zeros(L, self.hidden_size))
            self.register_buffer("hidden_std", torch.ones(L, self.hidden_size))
        if W:
            for name in PATH_TABLES:  # [layer, expert, unit]
                setattr(self, name, torch.nn.Parameter(torch.zeros(L, E, W)))
            self.path_bias = torch.nn.Parameter(torch.zeros(L, W))
            self.head = torch.nn.Parameter(torch.zeros(self.lookahead, L, W, E))
        if self.token_vocab:
            # per kept token id (sorted): how often each expert was used at each layer, by how many rows
            self.register_buffer("token_ids", torch.full((self.token_vocab,), -1, dtype=torch.int64))
            self.register_buffer("token_counts", torch.zeros(self.token_vocab, L, E))
            self.register_buffer("token_rows", torch.zeros(self.token_vocab))
            self.token_scale = torch.nn.Parameter(torch.zeros(self.lookahead, L))
        self.register_buffer("freq", torch.zeros(L, E))
        self.meta: dict = {}

    # -- the model -------------------------------------------------------------
    # Training reads the multi-hot inputs as dense [.., E] rows and multiplies: at K/E of about a tenth
    # that costs less than an embedding bag's backward, which sorts every index of the batch.
    def multi_hot(self, experts: np.ndarray) -> torch.Tensor:
        """Expert ids [..., K] (-1: none) as a multi-hot [..., E] float tensor."""
        idx = torch.from_numpy(np.where(experts >= 0, experts, self.num_experts))
        hot = torch.zeros(idx.shape[:-1] + (self.num_experts + 1,))
        return hot.scatter_(-1, idx, 1.0)[..., : self.num_experts]

    def path_hidden(self, cur: torch.Tensor, lags: torch.Tensor) -> torch.Tensor:
        """The path part's hidden units [B, L, W] for every source layer.

        ``cur`` [B, L, E] and ``lags`` [B, M, L, E] are multi-hot (the previous M
        tokens; all zero where there is none).
        """
        b, L, E = cur.shape
        per_layer = torch.einsum("ble,lew->blw", cur, self.path_cur)
        scale = torch.rsqrt(torch.arange(1, L + 1, dtype=torch.float32))[None, :, None]
        x = per_layer.cumsum(1) * scale + torch.einsum("ble,lew->blw", cur, self.path_last)  # layers <= l, and l
        x = x + (lags[:, 0].reshape(b, L * E) @ self.path_prev.reshape(L * E, -1))[:, None]
        if lags.shape[1] > 1:
            count = (lags[:, 1:].sum((2, 3)) > 0).sum(1).clamp_min(1)  # [B] older tokens there are
            hist = lags[:, 1:].sum(1).reshape(b, L * E) / count[:, None]
            x = x + (hist @ self.path_hist.reshape(L * E, -1))[:, None]
        return torch.relu(x + self.path_bias)

    def token_feature(self, tok: torch.Tensor, own: torch.Tensor | None = None,
                      own_rows: torch.Tensor | None = None) -> torch.Tensor:
        """log P(expert | token) - log P(expert) per layer [B, L, E] for ``tok`` [B], the rows'
        :meth:`token_rows_of` (0 where it is -1).

        A token's counts are smoothed towards the layer's marginal by one row's worth (a token
        seen once moves the estimate half way). ``own`` [B, L, E] and ``own_rows`` [B] (default 1):
        routing counts and rows to take out of each row's token (training rows are in the counts:
        the trainer takes out every row of the row's own request with that token, so the scales
        learn what the counts say about requests they have not seen).
        """
        K = self.top_k
        known = tok >= 0
        b = tok.clamp_min(0)
        counts, rows = self.token_counts[b], self.token_rows[b]  # [B, L, E], [B]
        if own is not None:
            taken = known.float() if own_rows is None else own_rows * known
            counts = (counts - own * known[:, None, None]).clamp_min(0.0)
            rows = (rows - taken).clamp_min(0.0)
        prior = (self.freq / K).clamp_min(1e-6)  # [L, E], each layer sums to 1
        q = (counts + K * prior) / (K * rows + K)[:, None, None]
        return (q.clamp_min(1e-9).log() - prior.log()) * known[:, None, None]

    def logits(self, cur: torch.Tensor, lags: torch.Tensor, distance: int, hidden: torch.Tensor | None = None,
               path: torch.Tensor | None = None, tok: torch.Tensor | None = None,
               tokfeat: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, L-d, E] of layer l+d's experts for every source layer l = 0 .. L-d-1.

        ``cur`` [B, L, E] and ``lags`` [B, M, L, E] (M >= 1; lag 1 is the previous
        token) are multi-hot; only cur's layers <= l are read for source l.
        ``hidden`` is [B, L-d, H] at the source layers; ``path`` is
        :meth:`path_hidden`'s output, passed when several distances share it;
        ``tok`` [B] are the rows' :meth:`token_rows_of` (-1: unknown), or
        ``tokfeat`` their :meth:`token_feature`.
        """
        d, nl = distance, self.num_layers - distance
        prev = lags[:, 0]
        before = torch.cat([torch.zeros_like(cur[:, :1]), cur[:, : nl - 1]], 1)  # layer l-1 (none for l = 0)
        x = torch.cat([cur[:, :nl], before, prev[:, d:], prev[:, d - 1: d - 1 + nl]], -1)  # [B, nl, 4E]
        w = self.weight[d - 1, :nl]  # [nl, 4E+1, E]
        out = torch.einsum("bnf,nfe->bne", x, w[:, :-1]) + w[:, -1]
        if self.hidden_size and hidden is not None:
            h = (hidden.float() - self.hidden_mean[:nl]) / self.hidden_std[:nl]  # [B, nl, H]
            out = out + torch.einsum("bnh,nhe->bne", h, self.hidden_weight[d - 1, :nl])
        if self.width:
            if path is None:
                path = self.path_hidden(cur, lags)
            out = out + torch.einsum("bnw,nwe->bne", path[:, :nl], self.head[d - 1, :nl])
        if self.token_vocab and (tok is not None or tokfeat is not None):
            if tokfeat is None:
                tokfeat = self.token_feature(tok)
            out = out + self.token_scale[d - 1, :nl, None] * tokfeat[:, d:]
        return out

    def token_rows_of(self, tokens: np.ndarray | None) -> np.ndarray | None:
        """Token ids [N] -> rows of the token part's tables [N] (-1: an id without counts), or None."""
        return token_index(self.token_ids.numpy(), tokens) if self.token_vocab else None

    def probs(self, cur, lags, distance, hidden=None, tok=None) -> torch.Tensor:
        """P(a token uses each expert) [B, L-d, E], estimated as K * softmax."""
        return (self.logits(cur, lags, distance, hidden, tok=tok).softmax(-1) * self.top_k).clamp_(max=1.0)

    @torch.no_grad()
    def predict_array(self, experts: np.ndarray, request: np.ndarray, distance: int, *,
                      phase: np.ndarray | None = None, hidden: np.ndarray | None = None,
                      tokens: np.ndarray | None = None, batch_rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Top-K experts [N, L-d, K] of layer l+d for every row and source layer l, and their probabilities.

        ``tokens`` [N] are the rows' token ids (read only by a model trained with them)."""
        experts = np.asarray(experts, dtype=np.int64)
        tok_rows = self.token_rows_of(tokens)
        lag_rows = history_rows(request, phase, self.history)
        nl = self.num_layers - distance
        out = np.empty((experts.shape[0], nl, self.top_k), dtype=np.int64)
        prob = np.empty(out.shape, dtype=np.float32)
        for s in range(0, experts.shape[0], batch_rows):
            h = None
            if self.hidden_size and hidden is not None:
                h = torch.from_numpy(np.asarray(hidden[s:s + batch_rows, :nl], dtype=np.float32))
            cur = self.multi_hot(experts[s:s + batch_rows])
            lags = self.multi_hot(gather_lags(experts, lag_rows[s:s + batch_rows]))
            tok = None if tok_rows is None else torch.from_numpy(tok_rows[s:s + batch_rows])
            top = self.probs(cur, lags, distance, h, tok).topk(self.top_k, dim=-1)
            out[s:s + batch_rows], prob[s:s + batch_rows] = top.indices.numpy(), top.values.numpy()
        return out, prob

    # -- files -----------------------------------------------------------------
    def config(self) -> dict:
        return {"num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
                "lookahead": self.lookahead, "hidden_size": self.hidden_size, "width": self.width,
                "history": self.history, "token_vocab": self.token_vocab,
                "features": TOKEN_FEATURES if self.token_vocab else FEATURES}

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {"weight": self.weight.detach().contiguous(), "freq": self.freq.detach().contiguous()}
        if self.hidden_size:
            tensors.update(hidden_weight=self.hidden_weight.detach().contiguous(),
                           hidden_mean=self.hidden_mean.contiguous(), hidden_std=self.hidden_std.contiguous())
        if self.width:
            for name in (*PATH_TABLES, "path_bias", "head"):
                tensors[name] = getattr(self, name).detach().contiguous()
        if self.token_vocab:
            for name in TOKEN_TABLES:
                tensors[name] = getattr(self, name).detach().contiguous()
        meta = {"format": FORMAT, "kind": "learned", "config": json.dumps(self.config())}
        meta.update({k: json.dumps(v) for k, v in self.meta.items()})
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> LearnedModel:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"predictor file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not a predictor file"
            raise ValueError(f"{path} is not a safetensors file: {exc}") from None
        if meta.get("format") != FORMAT or meta.get("kind") != "learned":
            raise ValueError(f"{path} is not a moepager learned predictor (format={meta.get('format')!r})")
        cfg = json.loads(meta["config"])
        if cfg.get("features") == DIRECT_ONLY:
            cfg.update(width=0, history=1)  # the direct part alone, as files were written before the path part
        elif cfg.get("features") not in (FEATURES, TOKEN_FEATURES):
            raise ValueError(f"{path} uses features {cfg.get('features')!r}, which this moepager cannot read; "
                             f"retrain it with `moepager predictor train`")
        model = cls(cfg["num_layers"], cfg["num_experts"], cfg["top_k"], cfg["lookahead"], cfg["hidden_size"],
                    cfg["width"], cfg["history"], int(cfg.get("token_vocab", 0)))
        tensors = load_file(str(path))
        with torch.no_grad():
            names = ["weight", "freq"]
            if model.hidden_size:
                names += ["hidden_weight", "hidden_mean", "hidden_std"]
            if model.width:
                names += [*PATH_TABLES, "path_bias", "head"]
            if model.token_vocab:
                names += list(TOKEN_TABLES)
            for name in names:
                getattr(model, name).copy_(tensors[name])
        model.meta = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "kind", "config")}
        return model.eval()


def history_rows(request: np.ndarray, phase: np.ndarray | None, lags: int) -> np.ndarray:
    """Row indices [N, lags] of each row's previous ``lags`` tokens in its request (-1: none).

    Rows of a request are taken in file order. With ``phase``, prefill rows
    (phase 0) get none; a decode row's lags are its request's previous rows.
    """
    request = np.asarray(request)
    n = len(request)
    order = np.argsort(request, kind="stable")
    same = np.zeros(n, dtype=bool)
    same[1:] = request[order[1:]] == request[order[:-1]]
    prev_row = np.full(n, -1, dtype=np.int64)
    prev_row[order[1:][same[1:]]] = order[:-1][same[1:]]
    out = np.full((n, lags), -1, dtype=np.int64)
    cur = prev_row
    for m in range(lags):
        out[:, m] = cur
        cur = np.where(cur >= 0, prev_row[np.maximum(cur, 0)], -1)
    if phase is not None:
        out[np.asarray(phase) == 0] = -1
    return out


def gather_lags(experts: np.ndarray, lag_rows: np.ndarray) -> np.ndarray:
    """The experts [B, M, L, K] of the rows ``lag_rows`` [B, M] point at (-1 where it is -1)."""
    got = experts[np.maximum(lag_rows, 0)]  # [B, M, L, K]
    return np.where((lag_rows >= 0)[:, :, None, None], got, -1)


def previous_rows(experts: np.ndarray, request: np.ndarray, phase: np.ndarray | None = None) -> np.ndarray:
    """The previous token's experts [N, L, K] for each row (-1 where there is none)."""
    experts = np.asarray(experts, dtype=np.int64)
    return gather_lags(experts, history_rows(request, phase, 1))[:, 0]


@register_predictor("learned")
class LearnedPredictor:
    def __init__(self, *, num_layers: int | None = None, num_experts: int | None = None, top_k: int | None = None,
                 lookahead: int = 1, path: str | None = None, model: LearnedModel | None = None,
                 candidates: int = CANDIDATES, **kwargs) -> None:
        if model is None:
            if path is None:
                raise ValueError("the learned predictor needs a trained file (--predictor-path PRED.safetensors; "
                                 "make one with `moepager predictor train`)")
            model = LearnedModel.load(path)
        for name, want in (("num_layers", num_layers), ("num_experts", num_experts), ("top_k", top_k)):
            if want is not None and int(want) != getattr(model, name):
                raise ValueError(f"predictor was trained for {name}={getattr(model, name)}, this model has {want}")
        if lookahead > model.lookahead:
            raise ValueError(f"predictor was trained for lookahead {model.lookahead}, asked for {lookahead}; "
                             f"retrain with --lookahead {lookahead}")
        self.model = model
        self.num_layers, self.num_experts, self.top_k = model.num_layers, model.num_experts, model.top_k
        self.lookahead, self.history, self.width = int(lookahead), model.history, model.width
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1 (guesses per routed expert and target layer), got {candidates}")
        self.candidates = int(candidates)
        # The per-layer path runs in numpy on views of the model's weights: tens of microseconds per
        # layer at T=1, where torch's per-op overhead would dominate.
        L, W = self.num_layers, self.width
        # [D, L, 4E+2, E]: the direct weights and an all-zero row (index 4E+1) for absent inputs.
        w = model.weight.detach().numpy()
        self._w = np.concatenate([w, np.zeros_like(w[:, :, :1])], axis=2)
        self._hw = None
        if model.hidden_size:
            self._hw = (model.hidden_weight.detach().numpy(), model.hidden_mean.numpy(), model.hidden_std.numpy())
        if W:
            self._cur_t, self._last_t, self._prev_t, self._hist_t = (getattr(model, n).detach().numpy()
                                                                     for n in PATH_TABLES)  # [L, E, W]
            self._bias = model.path_bias.detach().numpy()
            self._head = model.head.detach().numpy()  # [D, L, W, E]
            self._scale = 1.0 / np.sqrt(np.arange(1, L + 1))
        self._tok: np.ndarray | None = None  # this step's token rows [T] (observe_tokens), or None
        self._tokfeat: np.ndarray | None = None  # [T, L, E] their token_feature, or None
        self._token_scale = model.token_scale.detach().numpy() if model.token_vocab else None  # [D, L]
        self._layer_ids = np.arange(L)[:, None]
        self._cur: np.ndarray | None = None  # [T, L, K] this step's routing (-1 = not yet routed)
        self._path: np.ndarray | None = None  # [T, L, W] layer j's path_cur embedding bag, this step
        self._context: np.ndarray | None = None  # [T, W] this step's history input (set at its first layer)
        self._steps: list[np.ndarray] = []  # the request's last steps' routing [T', L, K], newest first
        self._tail: np.ndarray | None = None  # the request's last `history` tokens [<=M, L, K], newest first
        self._hidden: torch.Tensor | None = None

    def begin_request(self) -> None:
        self._steps, self._tail, self._cur = [], None, None

    @property
    def wants_tokens(self) -> bool:
        """Whether the model has a token part (else ``observe_tokens`` is a no-op)."""
        return self.model.token_vocab > 0

    def observe_tokens(self, tokens) -> None:
        """This step's input token ids [T], one per row the layers will route (call after ``reset``)."""
        if self.model.token_vocab and tokens is not None:
            self._tok = self.model.token_rows_of(np.asarray(tokens).reshape(-1))
            with torch.no_grad():
                self._tokfeat = self.model.token_feature(torch.from_numpy(self._tok)).numpy()

    def reset(self) -> None:
        self._tok = self._tokfeat = None
        if self._cur is not None:
            self._steps = [self._cur, *self._steps][: self.history]
            rows = self._cur[::-1]  # a step's rows are tokens in order: newest first
            self._tail = (rows if self._tail is None else np.concatenate([rows, self._tail]))[: self.history]
        self._cur = None

    def _lags(self, tokens: int) -> list[np.ndarray]:
        """The previous tokens' routing for this step, lag 1 first: [T or 1, L, K] each.

        At T=1 (decode) they are the request's last tokens, however the earlier
        forwards were batched (a prompt of one forward is a run of tokens). With
        T > 1 rows, a step of the same row count lends row i to row i, any other
        step its last row.
        """
        if tokens == 1:
            return [] if self._tail is None else [t[None] for t in self._tail]
        return [s if s.shape[0] == tokens else s[-1:] for s in self._steps]

    def observe(self, layer: int, hidden: torch.Tensor | None, top_k_index) -> None:
        idx = index_array(top_k_index)  # [T, K]
        tokens = idx.shape[0]
        if self._cur is None or self._cur.shape[0] != tokens:
            self._cur = np.full((tokens, self.num_layers, idx.shape[1]), -1, dtype=np.int64)
            if self.width:
                self._path = np.zeros((tokens, self.num_layers, self.width), dtype=np.float32)
                self._context = self._history_input(tokens)
        self._cur[:, layer] = idx
        if self.width:
            self._path[:, layer] = self._cur_t[layer, idx].sum(axis=1)
        self._hidden = hidden if self._hw is not None else None

    def _history_input(self, tokens: int) -> np.ndarray:
        """The previous token's and older tokens' embedding bags [T or 1, W]."""
        lags = self._lags(tokens)
        out = np.zeros((1, self.width), dtype=np.float32)
        if lags:
            out = self._bag(self._prev_t, lags[0])
        if len(lags) > 1:
            out = out + sum(self._bag(self._hist_t, g) for g in lags[1:]) / (len(lags) - 1)
        return out

    def _bag(self, table: np.ndarray, routing: np.ndarray) -> np.ndarray:
        """Sum over layers and experts of ``table`` [L, E, W] rows for ``routing`` [T, L, K]: [T, W]."""
        return table[self._layer_ids, routing].sum(axis=(1, 2))

    def predict(self, layer: int) -> list[tuple[ExpertKey, float]]:
        cur = self._cur
        if cur is None:
            return []
        tokens, _, k = cur.shape
        lags = self._lags(tokens)
        prev = lags[0] if lags else None
        h = hw = None
        if self._hidden is not None:
            hw, mean, std = self._hw
            # sync: the hidden state to the host (only for predictors trained with hidden states)
            h = (self._hidden.detach().to("cpu", torch.float32).numpy().reshape(tokens, -1) - mean[layer]) / std[layer]
        hid = None
        if self.width:
            x = self._path[:, : layer + 1].sum(axis=1) * self._scale[layer]  # [T, W]
            x += self._last_t[layer, cur[:, layer]].sum(axis=1) + self._context + self._bias[layer]
            hid = np.maximum(x, 0.0)
        targets = target_layers(layer, self.lookahead, self.num_layers)
        nd, first, E = len(targets), layer + 1, self.num_experts
        if nd == 0:
            return []
        # Direct-part weight rows [T, nd, 4K+1] of every target at once: cur[l], cur[l-1], prev[t], prev[t-1], bias.
        rows = np.empty((tokens, nd, 4 * k + 1), dtype=np.int64)
        rows[..., -1] = 4 * E
        rows[..., :k] = cur[:, None, layer]
        rows[..., k:2 * k] = cur[:, None, layer - 1] + E if layer >= 1 else 4 * E + 1
        if prev is None:
            rows[..., 2 * k:4 * k] = 4 * E + 1
        else:
            rows[..., 2 * k:3 * k] = prev[:, first:first + nd] + 2 * E
            rows[..., 3 * k:4 * k] = prev[:, layer:layer + nd] + 3 * E
        logits = self._w[np.arange(nd)[:, None], layer, rows].sum(axis=2)  # [T, nd, E]
        if h is not None:
            logits += (h @ hw[:nd, layer]).transpose(1, 0, 2)
        if hid is not None:
            logits += (hid @ self._head[:nd, layer]).transpose(1, 0, 2)
        if self._tokfeat is not None and self._tokfeat.shape[0] == tokens:
            logits += self._token_scale[:nd, layer, None] * self._tokfeat[:, first:first + nd]
        z = np.exp(logits - logits.max(axis=2, keepdims=True))
        p = np.minimum(z * (self.top_k / z.sum(axis=2, keepdims=True)), 1.0)  # [T, nd, E]
        p_any = p[0] if tokens == 1 else 1.0 - np.prod(1.0 - p, axis=0)  # some token of the step uses it
        out: list[tuple[ExpertKey, float]] = []
        for i, target in enumerate(targets):
            out += scored_top(target, i + 1, p_any[i], self.candidates * self.top_k * tokens)
        return out
