"""``learned``: a small model trained on routing traces that predicts the next layers' experts.

Design: one multinomial logistic model per (source layer l, distance d), over
multi-hot routing features that are all known when layer l has routed:

- the current token's experts at layers l and l-1 (cross-layer affinity);
- the previous token's experts at layers l+d and l+d-1 (temporal locality);
- optionally layer l's hidden state, standardised (when the trace recorded it).

Multi-hot inputs make the model an embedding-bag: the logits are a sum of 4K+1
weight rows, so it trains on a CPU in seconds to minutes and predicts in
microseconds. It is trained with a softmax cross-entropy against the true K-hot
target, so ``K * softmax`` estimates the chance that a token uses an expert.

File format (safetensors): ``weight [D, L, F, E]`` (F = 4E + 1, last row the
bias), ``freq [L, E]`` (training-split routing shares, for the baseline), and
when trained with hidden states ``hidden_weight [D, L, H, E]``, ``hidden_mean``
and ``hidden_std [L, H]``. Header metadata: ``format`` = ``moepager.predictor``,
``kind`` = ``learned``, ``config`` (JSON: num_layers, num_experts, top_k,
lookahead, hidden_size, features) and free JSON fields such as ``heldout``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cache.base import ExpertKey
from prefetch.base import index_array, register_predictor, scored_top, target_layers

FORMAT = "moepager.predictor"
FEATURES = "cur[l],cur[l-1],prev[l+d],prev[l+d-1],bias"


class LearnedModel(torch.nn.Module):
    def __init__(self, num_layers: int, num_experts: int, top_k: int, lookahead: int, hidden_size: int = 0) -> None:
        super().__init__()
        if lookahead < 1 or lookahead >= num_layers:
            raise ValueError(f"lookahead must be in 1..{num_layers - 1} for {num_layers} MoE layers, got {lookahead}")
        self.num_layers, self.num_experts, self.top_k = int(num_layers), int(num_experts), int(top_k)
        self.lookahead, self.hidden_size = int(lookahead), int(hidden_size)
        self.features = 4 * self.num_experts + 1
        self.pad = self.lookahead * self.num_layers * self.features  # index of the all-zero padding row
        self.weight = torch.nn.Parameter(torch.zeros(self.pad + 1, self.num_experts))
        if self.hidden_size:
            self.hidden_weight = torch.nn.Parameter(
                torch.zeros(self.lookahead, self.num_layers, self.hidden_size, self.num_experts))
            self.register_buffer("hidden_mean", torch.zeros(self.num_layers, self.hidden_size))
            self.register_buffer("hidden_std", torch.ones(self.num_layers, self.hidden_size))
        self.register_buffer("freq", torch.zeros(self.num_layers, self.num_experts))
        self.meta: dict = {}

    # -- the model -------------------------------------------------------------
    def feature_index(self, cur: np.ndarray, prev: np.ndarray, distance: int, layers: np.ndarray) -> torch.Tensor:
        """Weight-row indices [B, nl, 4K+1] for source ``layers`` at ``distance``.

        ``cur``/``prev`` are expert ids [B, L, K] (-1: unknown or no previous token);
        only cur's layers <= l are read.
        """
        E, L = self.num_experts, self.num_layers
        layers = np.asarray(layers, dtype=np.int64)
        blocks = [
            cur[:, layers],                                                   # [B, nl, K]
            np.where((layers >= 1)[None, :, None], cur[:, np.maximum(layers - 1, 0)], -1),
            prev[:, layers + distance],
            prev[:, layers + distance - 1],
        ]
        local = np.concatenate([np.where(b >= 0, b + i * E, -1) for i, b in enumerate(blocks)], axis=-1)
        local = np.concatenate([local, np.full(local.shape[:2] + (1,), 4 * E)], axis=-1)  # the bias row
        base = ((distance - 1) * L + layers) * self.features  # [nl]
        return torch.from_numpy(np.where(local >= 0, base[None, :, None] + local, self.pad))

    def logits(self, cur: np.ndarray, prev: np.ndarray, distance: int, layers,
               hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, nl, E] of layer l+distance's experts; ``hidden`` is [B, nl, H] at the source layers."""
        layers = np.asarray(layers, dtype=np.int64)
        idx = self.feature_index(cur, prev, distance, layers)  # [B, nl, J]
        b, nl, j = idx.shape
        out = F.embedding_bag(idx.reshape(b * nl, j), self.weight, mode="sum", padding_idx=self.pad)
        out = out.reshape(b, nl, self.num_experts)
        if self.hidden_size and hidden is not None:
            li = torch.from_numpy(layers)
            h = (hidden.float() - self.hidden_mean[li]) / self.hidden_std[li]  # [B, nl, H]
            out = out + torch.einsum("bnh,nhe->bne", h, self.hidden_weight[distance - 1, li])
        return out

    def probs(self, cur, prev, distance, layers, hidden=None) -> torch.Tensor:
        """P(a token uses each expert) [B, nl, E], estimated as K * softmax."""
        return (self.logits(cur, prev, distance, layers, hidden).softmax(-1) * self.top_k).clamp_(max=1.0)

    @torch.no_grad()
    def predict_array(self, experts: np.ndarray, request: np.ndarray, distance: int, *,
                      phase: np.ndarray | None = None, hidden: np.ndarray | None = None,
                      batch_rows: int = 1024) -> np.ndarray:
        """Top-K predicted experts [N, L-d, K] of layer l+d for every row and source layer l."""
        experts = np.asarray(experts, dtype=np.int64)
        prev = previous_rows(experts, request, phase)
        layers = np.arange(self.num_layers - distance)
        out = np.empty((experts.shape[0], len(layers), self.top_k), dtype=np.int64)
        for s in range(0, experts.shape[0], batch_rows):
            h = None
            if self.hidden_size and hidden is not None:
                h = torch.from_numpy(np.asarray(hidden[s:s + batch_rows, layers], dtype=np.float32))
            lg = self.logits(experts[s:s + batch_rows], prev[s:s + batch_rows], distance, layers, h)
            out[s:s + batch_rows] = lg.topk(self.top_k, dim=-1).indices.numpy()
        return out

    # -- files -----------------------------------------------------------------
    def config(self) -> dict:
        return {"num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
                    "lookahead": self.lookahead, "hidden_size": self.hidden_size, "features": FEATURES}

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        D, L, Fe, E = self.lookahead, self.num_layers, self.features, self.num_experts
        tensors = {"weight": self.weight.detach()[:-1].reshape(D, L, Fe, E).contiguous(),
                   "freq": self.freq.detach().contiguous()}
        if self.hidden_size:
            tensors.update(hidden_weight=self.hidden_weight.detach().contiguous(),
                           hidden_mean=self.hidden_mean.contiguous(), hidden_std=self.hidden_std.contiguous())
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
        if cfg.get("features") != FEATURES:
            raise ValueError(f"{path} uses features {cfg.get('features')!r}; this moepager reads {FEATURES!r}")
        model = cls(cfg["num_layers"], cfg["num_experts"], cfg["top_k"], cfg["lookahead"], cfg["hidden_size"])
        tensors = load_file(str(path))
        with torch.no_grad():
            model.weight[:-1] = tensors["weight"].reshape(-1, model.num_experts)
            model.freq.copy_(tensors["freq"])
            if model.hidden_size:
                model.hidden_weight.copy_(tensors["hidden_weight"])
                model.hidden_mean.copy_(tensors["hidden_mean"])
                model.hidden_std.copy_(tensors["hidden_std"])
        model.meta = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "kind", "config")}
        return model.eval()


def previous_rows(experts: np.ndarray, request: np.ndarray, phase: np.ndarray | None = None) -> np.ndarray:
    """The previous token's experts [N, L, K] for each row (-1 where there is none).

    The previous token is the previous row of the same request. With ``phase``,
    prefill rows (phase 0) get none: live, a prefill forward reaches layer l
    before the previous prompt token's later layers have routed.
    """
    experts = np.asarray(experts, dtype=np.int64)
    request = np.asarray(request)
    order = np.argsort(request, kind="stable")
    same = np.zeros(len(order), dtype=bool)
    same[1:] = request[order[1:]] == request[order[:-1]]
    prev_row = np.full(len(order), -1, dtype=np.int64)
    prev_row[order[1:][same[1:]]] = order[:-1][same[1:]]
    if phase is not None:
        prev_row[np.asarray(phase) == 0] = -1
    out = np.where((prev_row >= 0)[:, None, None], experts[np.maximum(prev_row, 0)], -1)
    return out


@register_predictor("learned")
class LearnedPredictor:
    def __init__(self, *, num_layers: int | None = None, num_experts: int | None = None, top_k: int | None = None,
                 lookahead: int = 1, path: str | None = None, model: LearnedModel | None = None, **kwargs) -> None:
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
        self.lookahead = int(lookahead)
        # The per-layer path runs in numpy on views of the model's weights: a few microseconds per
        # target layer at T=1, where torch's per-op overhead would dominate.
        E = self.num_experts
        self._w = model.weight.detach()[:-1].reshape(model.lookahead, self.num_layers, model.features, E).numpy()
        self._hw = None
        if model.hidden_size:
            self._hw = (model.hidden_weight.detach().numpy(), model.hidden_mean.numpy(), model.hidden_std.numpy())
        self._offsets = np.arange(4)[:, None] * E  # block offsets into a (l, d) weight matrix
        self._cur: np.ndarray | None = None  # [T, L, K] this step's routing (-1 = not yet routed)
        self._prev: np.ndarray | None = None  # [T', L, K] the previous step's
        self._hidden: torch.Tensor | None = None

    def begin_request(self) -> None:
        self._prev = None
        self._cur = None

    def reset(self) -> None:
        if self._cur is not None:
            self._prev = self._cur
        self._cur = None

    def observe(self, layer: int, hidden: torch.Tensor | None, top_k_index) -> None:
        idx = index_array(top_k_index)  # [T, K]
        if self._cur is None or self._cur.shape[0] != idx.shape[0]:
            self._cur = np.full((idx.shape[0], self.num_layers, idx.shape[1]), -1, dtype=np.int64)
        self._cur[:, layer] = idx
        self._hidden = hidden if self._hw is not None else None

    def predict(self, layer: int) -> list[tuple[ExpertKey, float]]:
        cur = self._cur
        if cur is None:
            return []
        tokens, _, k = cur.shape
        prev = self._prev
        if prev is not None and prev.shape[0] != tokens:
            prev = prev[-1:]  # e.g. the first decode step after a prefill: its last token came just before
        h = None
        if self._hidden is not None:
            hw, mean, std = self._hw
            # sync: the hidden state to the host (only for predictors trained with hidden states)
            h = (self._hidden.detach().to("cpu", torch.float32).numpy().reshape(tokens, -1) - mean[layer]) / std[layer]
        E = self.num_experts
        out: list[tuple[ExpertKey, float]] = []
        for target in target_layers(layer, self.lookahead, self.num_layers):
            d = target - layer
            w = self._w[d - 1, layer]  # [4E+1, E]
            blocks = np.full((tokens, 4, k), -1, dtype=np.int64)  # cur[l], cur[l-1], prev[l+d], prev[l+d-1]
            blocks[:, 0] = cur[:, layer]
            if layer >= 1:
                blocks[:, 1] = cur[:, layer - 1]
            if prev is not None:
                blocks[:, 2] = prev[:, target]
                blocks[:, 3] = prev[:, target - 1]
            valid = blocks >= 0
            rows = np.where(valid, blocks + self._offsets, 0).reshape(tokens, -1)  # [T, 4K]
            logits = (w[rows] * valid.reshape(tokens, -1, 1)).sum(axis=1) + w[4 * E]  # [T, E]
            if h is not None:
                logits = logits + h @ hw[d - 1, layer]
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            p = np.minimum(z / z.sum(axis=1, keepdims=True) * self.top_k, 1.0)  # [T, E]
            p_any = 1.0 - np.prod(1.0 - p, axis=0)  # some token of the step uses it
            out += scored_top(target, d, p_any, self.top_k * tokens)
        return out
