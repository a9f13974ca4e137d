"""The generation loop: continuous batching of prefill and decode over one transformers model.

``BatchGenerator`` owns the running batch. Each ``step()``:
  1) prefill: newly admitted sequences run together (left-padded) in their own fresh KV cache;
     the last position's logits give each one its first token;
  2) decode: every sequence that was already running gains one token in a single batched
     forward over the shared cache;
  3) bookkeeping: finished sequences leave at once (their KV rows are dropped) and the
     prefilled ones join the shared cache.
So every live sequence gains exactly one token per step. The model is any
``AutoModelForCausalLM``; the offloaded experts plug in underneath it and can observe each
forward through ``step_context``. When a cache layer type cannot be row-merged
(see ``engine.kv_rows``), joining re-prefills the whole batch instead: slower, same tokens.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from engine.detok import IncrementalDetokenizer, StopStringHolder
from engine.kv_rows import BatchKV, growing_cache, is_mergeable
from engine.sampling import Sampled, SamplingParams, TokenConstraint, make_generator, sample, top_logprobs

PREFILL, DECODE = 0, 1


@dataclass(frozen=True)
class StepInfo:
    """What one model forward computes, row by row, flattened batch-major ``[B*S]`` like the
    ``hidden_states [T, H]`` that the MoE experts function receives."""

    valid: torch.Tensor  # [B*S] bool, False for padding rows
    request: torch.Tensor  # [B*S] int64, stable sequence id, -1 for padding
    position: torch.Tensor  # [B*S] int64, position in its sequence, -1 for padding
    phase: int  # 0 prefill, 1 decode
    tokens: torch.Tensor  # [B*S] int64 input token ids


@dataclass
class TokenEvent:
    request_id: str
    token_id: int | None
    text: str  # text delta safe to emit now
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    num_prompt_tokens: int
    num_generated_tokens: int
    logprob: float | None = None  # the model's log-probability of token_id (when asked for)
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, log-probability), best first
    # First event only, when asked for: one entry per prompt token, None for the first token
    # (nothing predicts it), else (its log-probability, the top alternatives).
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None


@dataclass
class _Sequence:
    request_id: str
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    detok: IncrementalDetokenizer | None
    stops: StopStringHolder
    constraint: TokenConstraint | None = None
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list | None = None  # computed at prefill, sent with the first event

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.generated)


StepContext = Callable[[StepInfo], AbstractContextManager]


class BatchGenerator:
    def __init__(
        self,
        model,
        tokenizer,
        device: torch.device | str,
        *,
        max_batch_size: int = 16,
        max_model_len: int | None = None,
        step_context: StepContext | None = None,
        seq_ids: Iterator[int] | None = None,
    ) -> None:
        """``seq_ids``: where sequence ids come from (share one counter across generators to keep
        ``StepInfo.request`` unique for the life of an engine)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") \
            else model.config
        if max_model_len is None:
            max_model_len = getattr(config, "max_position_embeddings", None)
        self.max_model_len = max_model_len
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.pad_token_id = _pad_token_id(model, tokenizer, self.eos_token_ids)
        self._step_context = step_context
        self._cache_arg = cache_argument(model)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # row order of self._kv
        self._kv: BatchKV | None = None
        self._by_id: dict[str, _Sequence] = {}
        self._next_seq_id = seq_ids if seq_ids is not None else itertools.count()

    # ---- public API -------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def kv_bytes(self) -> int:
        """Bytes held by the running batch's KV cache now."""
        return self._kv.nbytes() if self._kv is not None else 0

    def sequence_id(self, request_id: str) -> int:
        """The integer id that ``StepInfo.request`` uses for ``request_id``."""
        return self._by_id[request_id].seq_id

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; it is prefilled at the next ``step()`` with room in the batch."""
        if request_id in self._by_id:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt must contain at least one token")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[0]}")
        if self.max_model_len is not None and len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context length of {self.max_model_len} tokens"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this generator has none (use stop_token_ids)")
        seq = _Sequence(
            request_id=request_id,
            seq_id=next(self._next_seq_id),
            prompt=prompt,
            params=params,
            generator=make_generator(params, self.device),
            detok=IncrementalDetokenizer(self.tokenizer, prompt) if self.tokenizer is not None else None,
            stops=StopStringHolder(params.stop),
            constraint=params.constraint.new() if params.constraint is not None else None,
        )
        self._by_id[request_id] = seq
        self._waiting.append(seq)

    def remove(self, request_id: str) -> TokenEvent | None:
        """Abort a request, waiting or running, and free its KV rows. None if it is not here
        (it may have finished already)."""
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return None
        if seq in self._waiting:
            self._waiting.remove(seq)
        else:
            row = self._running.index(seq)
            self._keep_rows([i for i in range(len(self._running)) if i != row])
        seq.finish_reason = "abort"
        return self._event(seq, None, "")

    def step(self) -> list[TokenEvent]:
        """One engine iteration; returns one event per sequence that produced a token."""
        with torch.no_grad():
            return self._step()

    # ---- the loop ---------------------------------------------------------------------------

    def _step(self) -> list[TokenEvent]:
        room = self.max_batch_size - len(self._running)
        new = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        events: list[TokenEvent] = []

        if new and self._running and not self._can_merge():
            # Fallback: one prefill over everything rebuilds the cache and yields each sequence's
            # next token (the running ones' decode token, the new ones' first).
            seqs = self._running + new
            self._kv = None
            kv, tokens = self._prefill(seqs, full=True)
            self._running = seqs
            self._kv = kv
            events += self._emit(seqs, tokens)
            self._drop_finished()
            return events

        # 1) prefill
        new_kv = None
        if new:
            new_kv, tokens = self._prefill(new, full=False)
            events += self._emit(new, tokens)

        # 2) decode
        if self._running:
            tokens = self._decode()
            events += self._emit(self._running, tokens)
            self._drop_finished()

        # 3) the prefilled sequences join the running batch
        if new_kv is not None:
            keep = [i for i, s in enumerate(new) if s.finish_reason is None]
            if keep:
                new_kv.select(keep)
                if self._kv is None:
                    self._kv = new_kv
                else:
                    self._kv.merge(new_kv)
                self._running += [new[i] for i in keep]
        return events

    def _can_merge(self) -> bool:
        return self._kv is None or is_mergeable(self._kv.cache)

    def _prefill(self, seqs: list[_Sequence], full: bool) -> tuple[BatchKV, list[int]]:
        """Left-padded forward over each sequence's tokens (the prompt, or everything so far when
        ``full``); returns the new cache and the next token of each sequence."""
        rows = [s.prompt + s.generated if full else s.prompt for s in seqs]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(r)) + r for r in rows])  # [B, S]
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # [B, S]
        position = mask.cumsum(-1) - 1  # [B, S], -1 on padding
        request = torch.tensor([s.seq_id for s in seqs])[:, None].expand(-1, width)
        request = request.masked_fill(mask == 0, -1)  # [B, S]
        cache = growing_cache(self.model.config)
        kv = BatchKV(cache, mask.to(self.device))
        scored = [i for i, s in enumerate(seqs) if s.params.prompt_logprobs is not None and s.prompt_logprobs is None]
        logits = self._forward(input_ids, kv.mask, position, request, cache, PREFILL, all_positions=bool(scored))
        if scored:
            for i in scored:
                seqs[i].prompt_logprobs = _prompt_logprobs(logits[i, width - len(rows[i]):], seqs[i])
            logits = logits[:, -1, :]  # [B, V]
        return kv, sample(logits, seqs)

    def _decode(self) -> list[int]:
        seqs = self._running
        kv = self._kv
        input_ids = torch.tensor([[s.generated[-1]] for s in seqs])  # [B, 1]
        position = torch.tensor([[s.num_tokens - 1] for s in seqs])  # [B, 1]
        request = torch.tensor([[s.seq_id] for s in seqs])  # [B, 1]
        kv.mask = torch.cat([kv.mask, kv.mask.new_ones(len(seqs), 1)], dim=1)  # [B, L+1]
        logits = self._forward(input_ids, kv.mask, position, request, kv.cache, DECODE)
        return sample(logits, seqs)

    def _forward(self, input_ids, mask, position, request, cache, phase: int,
                 all_positions: bool = False) -> torch.Tensor:
        """One model forward; returns the last position's logits ``[B, V]`` (every position's,
        ``[B, S, V]``, with ``all_positions``)."""
        dev = self.device
        input_ids, position, request = input_ids.to(dev), position.to(dev), request.to(dev)
        ctx = contextlib.nullcontext()
        if self._step_context is not None:
            valid = mask[:, -input_ids.shape[1]:].bool()  # [B, S]
            ctx = self._step_context(StepInfo(
                valid=valid.reshape(-1),
                request=request.reshape(-1),
                position=position.reshape(-1),
                phase=phase,
                tokens=input_ids.reshape(-1),
            ))
        with ctx:
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position.clamp(min=0),
                use_cache=True,
                **{self._cache_arg: cache},
                logits_to_keep=0 if all_positions else 1,
            )
        return out.logits if all_positions else out.logits[:, -1, :]  # [B, S, V] or [B, V]

    # ---- tokens to events -------------------------------------------------------------------

    def _emit(self, seqs: list[_Sequence], tokens: list[Sampled]) -> list[TokenEvent]:
        return [self._append(s, t) for s, t in zip(seqs, tokens, strict=True)]

    def _append(self, seq: _Sequence, sampled: Sampled) -> TokenEvent:
        p = seq.params
        if p.max_tokens == 0:  # scoring only: the prompt's log-probabilities, no token
            seq.finish_reason = "length"
            self._by_id.pop(seq.request_id, None)
            return self._event(seq, None, "")
        token = sampled.token
        seq.generated.append(token)
        if seq.constraint is not None:
            seq.constraint.accept(token)
        text = ""
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            # The stop token itself is not text; release what was held back for it.
            seq.finish_reason = "stop"
            text = self._finish_text(seq)
        else:
            if seq.detok is not None:
                text = seq.stops.push(seq.detok.push(token))
            if seq.stops.hit:
                seq.finish_reason = "stop"
            elif len(seq.generated) >= p.max_tokens or (
                self.max_model_len is not None and seq.num_tokens >= self.max_model_len
            ):
                text += self._finish_text(seq)
                seq.finish_reason = "stop" if seq.stops.hit else "length"
        if seq.finish_reason is not None:
            self._by_id.pop(seq.request_id, None)
        return self._event(seq, token, text, sampled)

    @staticmethod
    def _finish_text(seq: _Sequence) -> str:
        if seq.detok is None:
            return ""
        text = seq.stops.push(seq.detok.flush())
        return text + seq.stops.flush()

    @staticmethod
    def _event(seq: _Sequence, token: int | None, text: str, sampled: Sampled | None = None) -> TokenEvent:
        prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
        if prompt_logprobs is not None:
            seq.prompt_logprobs = []  # sent once; [] marks "done" so a re-prefill does not score again
        return TokenEvent(
            request_id=seq.request_id,
            token_id=token,
            text=text,
            finished=seq.finish_reason is not None,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=len(seq.prompt),
            num_generated_tokens=len(seq.generated),
            logprob=sampled.logprob if sampled is not None else None,
            top_logprobs=sampled.top_logprobs if sampled is not None else None,
            prompt_logprobs=prompt_logprobs or None,
        )

    def _drop_finished(self) -> None:
        self._keep_rows([i for i, s in enumerate(self._running) if s.finish_reason is None])

    def _keep_rows(self, rows: list[int]) -> None:
        self._running = [self._running[i] for i in rows]
        if not self._running:
            self._kv = None
        elif self._kv is not None:
            self._kv.select(rows)


def generate(
    model,
    tokenizer,
    device: torch.device | str,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    step_context: StepContext | None = None,
) -> Iterator[TokenEvent]:
    """Run ``prompts`` to completion, yielding events as tokens are produced. Request ids are
    the prompts' indices as strings ("0", "1", ...)."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
    gen = BatchGenerator(model, tokenizer, device, max_batch_size=max(1, len(prompts)),
                         step_context=step_context)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        gen.add(str(i), prompt, p)
    while gen.has_work:
        yield from gen.step()


def _prompt_logprobs(logits: torch.Tensor, seq: _Sequence) -> list:
    """Each prompt token's log-probability under the positions before it (``logits [P, V]``)."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # [P-1, V]: position j predicts token j+1
    targets = torch.tensor(seq.prompt[1:], dtype=torch.long, device=logp.device)
    chosen = logp.gather(-1, targets[:, None])[:, 0].tolist()  # sync: returned to the client
    k = seq.params.prompt_logprobs
    return [None] + [(c, top_logprobs(logp[j], k)) for j, c in enumerate(chosen)]


def cache_argument(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (the old name warns, then goes away);
    use whichever this version's forward declares."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """The ids that end a sequence: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    sources = [getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    if tokenizer is not None:
        sources.append(getattr(tokenizer, "eos_token_id", None))
    for eos in sources:
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(t) for t in eos)
    return frozenset(ids)


def _pad_token_id(model, tokenizer, eos_ids: frozenset[int]) -> int:
    """Any valid id works for padding (it is masked out); prefer the declared pad token."""
    vocab = model.get_input_embeddings().num_embeddings
    candidates = [
        getattr(getattr(model, "generation_config", None), "pad_token_id", None),
        getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None,
        *sorted(eos_ids),
    ]
    for c in candidates:
        if isinstance(c, int) and 0 <= c < vocab:
            return c
    return 0
