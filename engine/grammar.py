"""Structured output: a grammar (JSON schema, any JSON object, or a tool-call format) applied as
a token mask in the sampler, so the output is guaranteed to parse and match.

Design
- llguidance computes the mask: it builds the token trie once per tokenizer (tens of ms for
  a 150k vocabulary), needs no GPU, no triton and no torch extension, and a mask costs a few
  microseconds to a millisecond on the CPU, which fits a decode step on a host where missed
  experts already dominate. xgrammar needs triton on Linux (a large install) and outlines-core
  compiles a full index per schema up front; both work, neither is lighter.
- One ``GrammarFactory`` per request (compiled once), one ``GrammarConstraint`` per sequence
  (the matcher state). The model's end-of-sequence ids are allowed whenever the grammar
  accepts, and are the only tokens allowed once it is complete, so a constrained sequence
  ends exactly where its document does.
"""

from __future__ import annotations

import json
from typing import Any

import torch

_TOKENIZERS: dict[int, Any] = {}
# Compact JSON (", " and ": " separators, no free whitespace): a weak model cannot pad forever.
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """The grammar or schema cannot be compiled."""


def _ll_tokenizer(tokenizer: Any) -> Any:
    import llguidance.hf

    key = id(tokenizer)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = llguidance.hf.from_tokenizer(tokenizer)
    return _TOKENIZERS[key]


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """A grammar for one JSON value matching ``schema`` (None: any JSON object)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                         defaults=_JSON_OPTIONS)


def lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


def tool_call_grammar(tools: list[dict[str, Any]], multiple: bool) -> str:
    """Qwen-style ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks, each call
    matching one of ``tools`` (OpenAI function specs: name and JSON-schema parameters)."""
    variants = []
    for tool in tools:
        params = tool.get("parameters") or {"type": "object", "properties": {}}
        variants.append({"type": "object", "properties": {"name": {"const": tool["name"]}, "arguments": params},
                         "required": ["name", "arguments"], "additionalProperties": False})
    schema = dict(variants[0] if len(variants) == 1 else {"anyOf": variants}, **{"x-guidance": _JSON_OPTIONS})
    rule = "call" if not multiple else 'call ("\\n" call)*'
    lark = (f"start: {rule}\n"
            f'call: "<tool_call>\\n" body "\\n</tool_call>"\n'
            f"body: %json {json.dumps(schema)}\n")
    return lark_grammar(lark)


class GrammarFactory:
    """A compiled grammar for one request; ``new()`` gives each sequence its own state."""

    def __init__(self, tokenizer: Any, grammar: str, vocab_size: int, stop_ids: frozenset[int]) -> None:
        import llguidance

        self._ll_tokenizer = _ll_tokenizer(tokenizer)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._ll_tokenizer)
        if failed:
            raise GrammarError("; ".join(messages) or "invalid grammar")
        self._grammar = grammar
        self.vocab_size = vocab_size
        self.stop_ids = torch.tensor(sorted(i for i in stop_ids if i < vocab_size), dtype=torch.long)

    def new(self) -> GrammarConstraint:
        return GrammarConstraint(self)


class GrammarConstraint:
    """One sequence's matcher: ``allowed()`` before sampling, ``accept(token)`` after."""

    def __init__(self, factory: GrammarFactory) -> None:
        import llguidance
        import llguidance.torch

        self._factory = factory
        self._matcher = llguidance.LLMatcher(factory._ll_tokenizer, factory._grammar)
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, factory._ll_tokenizer.vocab_size)
        self._fill = llguidance.torch.fill_next_token_bitmask
        self._bits = torch.arange(32, dtype=torch.int32)
        self.done = False

    def allowed(self) -> torch.Tensor:
        """``[V]`` bool: the tokens the grammar allows next."""
        vocab = self._factory.vocab_size
        out = torch.zeros(vocab, dtype=torch.bool)
        if self.done:  # complete (or broken): only the end of the sequence is left
            out[self._factory.stop_ids] = True
            return out
        if not self._matcher.is_stopped():
            self._fill(self._matcher, self._bitmask, 0)
            bits = ((self._bitmask[0].unsqueeze(-1) >> self._bits) & 1).bool().reshape(-1)  # [32 * W]
            n = min(vocab, bits.shape[0])
            out[:n] = bits[:n]
        if self._matcher.is_accepting() or self._matcher.is_stopped():
            out[self._factory.stop_ids] = True
        return out

    def accept(self, token: int) -> None:
        if token in self._factory.stop_ids.tolist() and self._matcher.is_accepting():
            self.done = True
            return
        if not self._matcher.consume_token(token):
            # The mask makes this unreachable; if it happens, end this sequence rather than fail
            # the whole batch from inside the engine step.
            self.done = True
