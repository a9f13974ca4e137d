"""Streaming text for one sequence: incremental detokenization and stop-string holding.

Design
- Tokens do not map to whole characters (byte-level BPE splits UTF-8 sequences) and a token's
  text can depend on its left neighbours (SentencePiece's leading space). Fast tokenizers use
  ``tokenizers``' own ``DecodeStream``, primed with the last prompt tokens, which releases text
  once the bytes form whole characters. Other tokenizers decode each new token together with
  a short window of earlier ones and release the delta once it does not end in U+FFFD.
- A stop string may arrive split over several tokens. Text that could be the start of a stop
  string is held back until the next tokens show whether it is one; on a hit the text before
  the stop string is released and the stop string itself never is.
"""

from __future__ import annotations

# How many prompt tokens give the first generated token its left context when decoding.
_CONTEXT_TOKENS = 5


def _decode_stream(tokenizer, prompt_ids: list[int]):
    """(DecodeStream, backend tokenizer), or None where tokenizers lacks it or the tokenizer is slow."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        from tokenizers.decoders import DecodeStream

        return DecodeStream(ids=list(prompt_ids[-_CONTEXT_TOKENS:]), skip_special_tokens=True), backend
    except (ImportError, TypeError):  # tokenizers < 0.22 has no prefill
        return None


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas that never split a character."""

    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # start of the decode window
        self._read = len(self._ids)  # tokens before this index have been released as text
        self._stream = _decode_stream(tokenizer, prompt_ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that became complete (may be "")."""
        self._ids.append(token_id)
        if self._stream is not None:
            stream, backend = self._stream
            try:
                text = stream.step(backend, token_id)
            except Exception:  # noqa: BLE001 - an id the tokenizer does not know (padded vocabularies)
                return ""
            if text is None:
                return ""
            self._prefix = self._read = len(self._ids)
            return text
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of the sequence: whatever text is still held, complete or not."""
        if self._stream is not None:
            # Bytes that never formed a character: decode them as the non-streaming path would.
            held = self._ids[self._read:]
            self._read = len(self._ids)
            return self._decode(held) if held else ""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text) :]


class StopStringHolder:
    """Filters a text stream: releases text that cannot be part of a stop string, detects hits."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Add text; returns what is safe to emit. After a hit, ``hit`` is True and nothing more is emitted."""
        if self.hit:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        # Earliest occurrence of any stop string wins.
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            self._held = ""
            return buf[:cut]
        hold = self._longest_stop_prefix_suffix(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """At the end of the sequence without a hit: the held text was not a stop string after all."""
        text, self._held = self._held, ""
        return "" if self.hit else text

    def _longest_stop_prefix_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some stop string."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best
