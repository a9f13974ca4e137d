"""Tool calling: rendering ``tools`` through the chat template, parsing the model's calls, and
the grammar that enforces ``tool_choice: "required"`` or a named function.

Design
- The chat template renders the tools (Qwen-style templates, the embedded model's included,
  take a ``tools`` variable); a template that never mentions ``tools`` cannot show them to
  the model, so the request is a 400 rather than a model that silently never calls one.
- Calls are parsed from the Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  format. GPT-OSS's harmony format needs ``openai-harmony`` and is refused with a 400 that
  says so (not built).
- ``required`` and named functions are enforced with the structured-output grammar over the
  same format, so even a small model emits a call that parses and matches the schema.
- Streaming: content is streamed until a ``<tool_call>`` opening could start; a call is sent
  as one ``tool_calls`` delta (id, name and the complete arguments) once its closing tag
  arrives, which OpenAI clients assemble like any other.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.errors import APIError
from server.protocol import ChatCompletionRequest, NamedToolChoice

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def tools_active(body: ChatCompletionRequest) -> bool:
    return bool(body.tools) and body.tool_choice != "none"


def template_tools(template: Any, body: ChatCompletionRequest) -> list[dict] | None:
    """The ``tools`` argument of the chat template, or None; 400 if the template cannot show them."""
    if not tools_active(body):
        return None
    template = template or ""
    if isinstance(template, dict):  # several named templates: the default one renders
        template = template.get("default", "") or ""
    if "tools" not in template:
        raise APIError(400, "this model's chat template does not support tools (it never renders them); "
                       "give one that does with --chat-template", param="tools")
    if "<|channel|>" in template:
        raise APIError(400, "tool calls in GPT-OSS's harmony format are not supported yet", param="tools")
    return [t.model_dump(exclude_none=True) for t in body.tools or ()]


def history_message(message: Any) -> dict:
    """One request message as the chat template expects it (tool calls with dict arguments)."""
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                           "content": message.text()}
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            try:
                arguments: Any = json.loads(call.function.arguments)
            except json.JSONDecodeError:
                arguments = call.function.arguments
            calls.append({"id": call.id, "type": "function",
                          "function": {"name": call.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out


def forced_tools(body: ChatCompletionRequest) -> tuple[list[dict], bool] | None:
    """(function specs, several calls allowed) that the grammar must enforce, or None for auto."""
    if not tools_active(body):
        return None
    specs = [t.function.model_dump(exclude_none=True) for t in body.tools or ()]
    if isinstance(body.tool_choice, NamedToolChoice):
        return [s for s in specs if s["name"] == body.tool_choice.function.name], False
    if body.tool_choice == "required":
        return specs, body.parallel_tool_calls
    return None


def parse_calls(text: str, parallel: bool = True) -> tuple[str | None, list[ParsedCall]]:
    """(content outside the calls or None, calls) from a complete output. A block that is not
    a JSON object with a name stays in the content."""
    calls: list[ParsedCall] = []
    content = text
    for match in _CALL.finditer(text):
        call = _parse_one(match.group(1))
        if call is None:
            continue
        if calls and not parallel:
            break
        calls.append(call)
        content = content.replace(match.group(0), "", 1)
    if not calls:
        return text, []
    content = content.strip()
    return (content or None), calls


def _parse_one(body: str) -> ParsedCall | None:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    return ParsedCall(data["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


class ToolStreamParser:
    """Splits a streamed output into content deltas and complete tool calls."""

    def __init__(self, parallel: bool = True) -> None:
        self._buf = ""
        self._parallel = parallel
        self.calls: list[ParsedCall] = []

    def push(self, text: str) -> tuple[str, list[ParsedCall]]:
        """Add text; returns (content safe to emit, calls completed by it)."""
        self._buf += text
        content, done = "", []
        while True:
            start = self._buf.find(OPEN)
            if start < 0:
                hold = _prefix_overlap(self._buf, OPEN)
                content += self._buf[: len(self._buf) - hold]
                self._buf = self._buf[len(self._buf) - hold:]
                return content, done
            content += self._buf[:start]
            end = self._buf.find(CLOSE, start)
            if end < 0:
                self._buf = self._buf[start:]
                return content, done
            block = self._buf[start: end + len(CLOSE)]
            self._buf = self._buf[end + len(CLOSE):]
            call = _parse_one(block[len(OPEN): -len(CLOSE)].strip())
            if call is None:
                content += block
            elif self._parallel or not self.calls:
                self.calls.append(call)
                done.append(call)

    def flush(self) -> str:
        """At the end: text still held (an unfinished call is returned as plain content)."""
        text, self._buf = self._buf, ""
        return text


def _prefix_overlap(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
