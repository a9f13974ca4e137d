"""Sampling parameters of one request and the next-token choice from a batch of logits.

Each sequence owns its own ``torch.Generator``: a seeded request draws the same random numbers
whatever else shares its batch, so its tokens do not depend on the batch composition (up to
float rounding of the logits themselves, which is far below any sampling boundary in practice).

Design
- Log-probabilities are the model's own ``log_softmax`` of the raw logits, taken before any
  sampling control (bias, penalties, grammar mask, temperature, top-k/p, min-p), as vLLM
  reports them by default: an evaluation harness gets the model's likelihoods whatever it
  sends for sampling.
- Controls apply in a fixed order: logit_bias, repetition penalty (over prompt and output),
  frequency and presence penalties (over output), the grammar mask, then temperature and the
  truncations (top-k, top-p, min-p). Penalties and bias change greedy choices too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

MAX_LOGPROBS = 20
_BIG = 1e30  # stands in for +inf logits; finite after division by any sane temperature


class TokenConstraint(Protocol):
    """Per-sequence grammar state (``engine.grammar``): which tokens may come next."""

    def allowed(self) -> torch.Tensor: ...  # [V] bool

    def accept(self, token: int) -> None: ...


class ConstraintFactory(Protocol):
    def new(self) -> TokenConstraint: ...


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # 0 only with prompt_logprobs: score the prompt, generate nothing
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # accepts a {token id: bias} dict
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's log-probability and the top k
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's log-probability and the top k
    constraint: ConstraintFactory | None = field(default=None, compare=False)  # structured output

    def __post_init__(self) -> None:
        # Lists and dicts are accepted at the edge (JSON has no tuples) and frozen here.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((t, b) for t, b in bias))

        minimum = 0 if self.prompt_logprobs is not None else 1
        if not _is_int(self.max_tokens) or self.max_tokens < minimum:
            raise ValueError(f"max_tokens must be an integer >= {minimum}, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_real(self.repetition_penalty) or not 0.01 <= self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in [0.01, 10], got {self.repetition_penalty!r}")
        for t, b in self.logit_bias:
            if not _is_int(t) or t < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {t!r}")
            if not _is_real(b) or not -100 <= b <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {t!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")  # noqa: TRY004 - HTTP 400

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The per-sequence generator; None for greedy requests (they draw nothing)."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()  # fresh non-deterministic seed
    else:
        gen.manual_seed(params.seed)
    return gen


class SampleRow(Protocol):
    """What ``sample`` reads of one sequence (``engine.generation._Sequence`` has these)."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt: list[int]
    generated: list[int]
    constraint: TokenConstraint | None


@dataclass
class Sampled:
    token: int
    logprob: float | None = None  # the model's log-probability of ``token``
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, log-probability), best first


def top_logprobs(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` best (token id, log-probability) of one row ``logp [V]``."""
    if k <= 0:
        return []
    values, ids = torch.topk(logp, min(k, logp.shape[-1]))
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def apply_controls(row: torch.Tensor, r: SampleRow) -> torch.Tensor:
    """Bias, penalties and the grammar mask on one row of logits ``[V]`` (a new tensor)."""
    p = r.params
    vocab = row.shape[-1]
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias if t < vocab], dtype=torch.long, device=row.device)
        bias = torch.tensor([b for t, b in p.logit_bias if t < vocab], dtype=row.dtype, device=row.device)
        row = row.index_add(0, ids, bias)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(r.prompt + r.generated, dtype=torch.long, device=row.device).unique()
        vals = row[seen]
        row = row.index_copy(0, seen, torch.where(vals > 0, vals / p.repetition_penalty,
                                                  vals * p.repetition_penalty))
    if (p.frequency_penalty or p.presence_penalty) and r.generated:
        counts = torch.bincount(torch.tensor(r.generated, dtype=torch.long, device=row.device),
                                minlength=vocab)[:vocab].to(row.dtype)  # [V]
        row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
    # Controls must not make a logit NaN or +inf (softmax would fail for the whole batch).
    row = torch.nan_to_num(row, nan=float("-inf"), posinf=_BIG)
    if r.constraint is not None:
        allowed = r.constraint.allowed().to(row.device)  # [V] bool
        row = row.masked_fill(~allowed[:vocab], float("-inf"))
    return row


def _draw(row: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    row = torch.nan_to_num(row / p.temperature, nan=float("-inf"), posinf=_BIG)  # [V]
    if p.top_k > 0 and p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)  # [V]
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(row.argmax().item())  # degenerate distribution (everything masked): greedy
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample(logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[Sampled]:
    """Next token for each row of ``logits [B, V]``, row i following ``rows[i]``."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)  # [B]
    out = [Sampled(t) for t in greedy.tolist()]  # sync: the loop needs the token ids on the host anyway
    for i, r in enumerate(rows):
        p = r.params
        controlled = bool(p.logit_bias or p.has_penalties or r.constraint is not None)
        row = apply_controls(logits[i], r) if controlled else logits[i]
        if not p.greedy:
            out[i].token = _draw(row, p, r.generator)
        elif controlled:
            out[i].token = int(row.argmax().item())
        if p.logprobs is not None:
            logp = torch.log_softmax(logits[i], dim=-1)  # [V], before any control
            out[i].logprob = float(logp[out[i].token])
            out[i].top_logprobs = top_logprobs(logp, p.logprobs)
    return out

