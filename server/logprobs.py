"""Log-probabilities in OpenAI's two shapes: chat (``content: [{token, logprob, bytes,
top_logprobs}]``) and completions (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``), with ``echo`` prepending the prompt's tokens (the first has no log-probability).

Values are the model's log-softmax before any sampling control (``engine.sampling``). A token's
text is its own decoding (a byte-level piece of a multi-byte character decodes to U+FFFD, as
in vLLM); models without a tokenizer show ``token_id:N``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from server.protocol import ChoiceLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


class TokenTexts:
    """Token id -> text, cached per tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.text = lru_cache(maxsize=65536)(self._text)

    def _text(self, token: int) -> str:
        if self._tokenizer is None:
            return f"token_id:{token}"
        return self._tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _finite(value: float) -> float:
    # JSON has no -inf; a token the model gives zero probability gets the smallest float.
    return value if math.isfinite(value) else -9999.0


def chat_logprobs(texts: TokenTexts, entries: list[tuple[int, float, list]]) -> ChoiceLogprobs:
    content = []
    for token, logprob, top in entries:
        text = texts.text(token)
        content.append(TokenLogprob(
            token=text, logprob=_finite(logprob), bytes=list(text.encode("utf-8")),
            top_logprobs=[TopLogprob(token=texts.text(t), logprob=_finite(lp),
                                     bytes=list(texts.text(t).encode("utf-8"))) for t, lp in top]))
    return ChoiceLogprobs(content=content)


def completion_logprobs(texts: TokenTexts, entries: list[tuple[int, float, list]],
                        prompt: list[int] | None = None, prompt_logprobs: list | None = None,
                        offset: int = 0) -> CompletionLogprobs:
    """``prompt`` and ``prompt_logprobs`` (echo) come first; ``offset`` is where the first token's
    text starts in the choice's text."""
    out = CompletionLogprobs()
    rows: list[tuple[int, float | None, list | None]] = []
    if prompt is not None:
        for token, entry in zip(prompt, prompt_logprobs or [None] * len(prompt), strict=True):
            rows.append((token, None, None) if entry is None else (token, entry[0], entry[1]))
    rows += [(t, lp, top) for t, lp, top in entries]
    for token, logprob, top in rows:
        text = texts.text(token)
        out.tokens.append(text)
        out.token_logprobs.append(None if logprob is None else _finite(logprob))
        out.top_logprobs.append(None if top is None else {texts.text(t): _finite(lp) for t, lp in top})
        out.text_offset.append(offset)
        offset += len(text)
    return out
