"""Affinity keys: which requests should land on the same replica.

Design: a replica's expert cache (and, later, its prefix cache) warms to the conversations it
serves, so the key names a conversation. An explicit ``X-Conversation-Id`` (or
``X-Session-Id``) header wins. Without one, the key hashes the start of the prompt: for chat,
the messages up to and including the first user message (a multi-turn client resends them
on every turn, so every turn hashes the same); for completions, the first ``prefix_chars``
characters of the prompt. Requests that have neither get no key and go to the least-loaded
replica. Pure functions, no Ray import: the router, the ingress and the tests share them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

CONVERSATION_HEADERS = ("x-conversation-id", "x-session-id")
DEFAULT_PREFIX_CHARS = 256


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _leading_messages(messages: list[Any]) -> list[Any]:
    """Messages up to and including the first user message (system prompts stay in)."""
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return messages[: i + 1]
    return messages[:1]


def prompt_prefix(body: Mapping[str, Any], prefix_chars: int = DEFAULT_PREFIX_CHARS) -> str | None:
    """The text whose hash keys a request without a conversation id; None when it has no prompt."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        text = json.dumps(_leading_messages(messages), sort_keys=True, ensure_ascii=False)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = prompt[0] if len(prompt) == 1 else None  # a batch of prompts has no single home
        if isinstance(prompt, str):
            text = prompt
        else:
            return None
    return text[:prefix_chars] if text else None


def affinity_key(headers: Mapping[str, str], body: bytes | Mapping[str, Any] | None,
                 prefix_chars: int = DEFAULT_PREFIX_CHARS) -> str | None:
    """``conv:<id>`` from a conversation header, else ``prefix:<hash>`` of the prompt's start, else None.

    ``headers`` must have lower-case names (as ASGI and Starlette give them).
    """
    for name in CONVERSATION_HEADERS:
        value = headers.get(name)
        if value:
            return "conv:" + value
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            return None
    if not isinstance(body, Mapping):
        return None
    text = prompt_prefix(body, prefix_chars)
    return None if text is None else "prefix:" + _digest(text)
