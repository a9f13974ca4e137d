"""What OpenAI clients and harnesses depend on, through the official client on a real socket:
log-probabilities (checked against the engine's own logits), tools (named, required, auto),
both structured-output formats, sampling controls, and a 400 for every unsupported field."""

from __future__ import annotations

import json
from importlib.resources import files

import httpx
import openai
import pytest
import torch
from serving_helpers import live_server, make_app

# The tiny test model has 128 positions: a compact template that still renders tools and calls.
TEMPLATE = ("{% if tools %}tools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
            "{% for m in messages %}{{ m.role }}: {{ m.content or '' }}{% for c in m.tool_calls or [] %}"
            "<tool_call>{{ c.function.name }}</tool_call>{% endfor %}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
EMBEDDED_TEMPLATE = files("engine.default_model").joinpath("chat_template.jinja").read_text()
WEATHER = {"type": "function", "function": {
    "name": "w", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"c": {"enum": ["P", "O"]}},
                   "required": ["c"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "t", "parameters": {"type": "object", "properties": {"u": {"type": "boolean"}},
                                "required": ["u"], "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
          "required": ["ok", "color"], "additionalProperties": False}
USER = [{"role": "user", "content": "hello"}]
MODEL = "tiny"


@pytest.fixture(scope="module")
def base(engine):
    with live_server(make_app(engine, chat_template=TEMPLATE, served_model_name=MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


def log_softmax_rows(engine, ids: list[int]) -> torch.Tensor:
    """The engine's own next-token log-probabilities at every position of ``ids``: [T, V]."""
    return torch.log_softmax(engine.logits(torch.tensor([ids]))[0].float(), dim=-1)


def tokenize(base: str, text: str) -> list[int]:
    return httpx.post(base + "/tokenize", json={"prompt": text, "add_special_tokens": True}).json()["tokens"]


# ---- log-probabilities ------------------------------------------------------------------------

def test_chat_logprobs_equal_the_engines(client, base, engine):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    prompt = httpx.post(base + "/tokenize", json={"messages": USER}).json()["tokens"]
    generated = [engine.tokenizer.encode(c.token, add_special_tokens=False) for c in content]
    assert all(len(g) == 1 for g in generated)
    generated = [g[0] for g in generated]
    rows = log_softmax_rows(engine, prompt + generated)
    for k, entry in enumerate(content):
        row = rows[len(prompt) - 1 + k]
        assert entry.logprob == pytest.approx(float(row[generated[k]]), abs=1e-4)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(float(row.max()), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the best token was chosen
        assert entry.bytes == list(entry.token.encode())


def test_chat_stream_carries_logprobs(client):
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0,
                                            logprobs=True, stream=True, extra_body={"ignore_eos": True})
    entries = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    plain = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0,
                                           logprobs=True, extra_body={"ignore_eos": True})
    assert [(e.token, round(e.logprob, 5)) for e in entries] == \
        [(e.token, round(e.logprob, 5)) for e in plain.choices[0].logprobs.content]


def test_echo_scores_the_prompt_with_zero_tokens(client, base, engine):
    ids = tokenize(base, "the cat sat")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=2)
    (choice,) = r.choices
    lp = choice.logprobs
    assert r.usage.completion_tokens == 0 and choice.finish_reason == "length"
    assert choice.text == "the cat sat" and len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    rows = log_softmax_rows(engine, ids)
    expected = [float(rows[j - 1, ids[j]]) for j in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo_alone_returns_the_prompt(base):
    r = httpx.post(base + "/v1/completions", json={"prompt": "the cat", "max_tokens": 0, "echo": True}).json()
    assert r["choices"][0]["text"] == "the cat" and r["choices"][0]["logprobs"] is None


def test_echo_with_one_token_and_completion_logprobs(client, base):
    ids = tokenize(base, "abc")
    r = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=1, echo=True, logprobs=1,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1
    last_top = lp.top_logprobs[-1]
    assert max(last_top.values()) == pytest.approx(lp.token_logprobs[-1])  # greedy token is the top one
    plain = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, logprobs=0, temperature=0)
    assert len(plain.choices[0].logprobs.token_logprobs) == 3 and plain.choices[0].logprobs.top_logprobs == [{}] * 3


# ---- structured output ------------------------------------------------------------------------

def test_json_schema_output_parses_and_matches(client):
    r = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=60, temperature=1.0, seed=3, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}})
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        data = json.loads(choice.message.content)
        assert set(data) == {"ok", "color"} and isinstance(data["ok"], bool) and data["color"] in ("red", "green")


def test_json_object_mask_applies(client, engine):
    brace = engine.tokenizer.convert_tokens_to_ids("}")
    bias = {str(brace): 100}
    free = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, temperature=0,
                                          logit_bias=bias, extra_body={"ignore_eos": True})
    assert free.choices[0].message.content == "}}}"  # the bias alone forces the brace
    forced = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=20, temperature=0,
                                            logit_bias=bias, response_format={"type": "json_object"})
    assert forced.choices[0].message.content == "{}" and forced.choices[0].finish_reason == "stop"


def test_bad_schema_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
    assert "response_format" in str(info.value)


# ---- tools ------------------------------------------------------------------------------------

def test_named_tool_is_called(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=80, temperature=0,
                                       tools=[WEATHER, TIME],
                                       tool_choice={"type": "function", "function": {"name": "w"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "w" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) in ({"c": "P"}, {"c": "O"})


def test_required_tool_streams_as_openai_does(client):
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=90, temperature=0.8,
                                            seed=1, tools=[WEATHER, TIME], tool_choice="required",
                                            parallel_tool_calls=False, stream=True)
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].index == 0 and calls[0].function.name in ("w", "t")
    json.loads("".join(tc.function.arguments for tc in calls))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_auto_tools_answer_and_history_renders(client):
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "t", "arguments": '{"u": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    r = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0,
                                       tools=[WEATHER, TIME])
    message = r.choices[0].message
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert message.content is not None or message.tool_calls


def test_embedded_template_renders_tools():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(files("engine.default_model")))
    assert tokenizer.chat_template == EMBEDDED_TEMPLATE
    plain = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert plain == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    text = tokenizer.apply_chat_template(USER, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert "<tools>" in text and '"name": "w"' in text and text.endswith(plain)


def test_tools_without_template_support_are_400(server_url):
    # The shared server's test tokenizer has no chat template: tools cannot be shown to the model.
    r = httpx.post(server_url + "/v1/chat/completions",
                   json={"messages": USER, "tools": [WEATHER], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_tool_call_parsing():
    from server.tools import ToolStreamParser, parse_calls

    text = 'ok <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call><tool_call>{"name": "g"}</tool_call>'
    content, calls = parse_calls(text)
    assert content == "ok" and [c.name for c in calls] == ["f", "g"] and json.loads(calls[0].arguments) == {"a": 1}
    assert parse_calls("<tool_call>not json</tool_call>")[1] == []
    parser = ToolStreamParser()
    out, done = "", []
    for piece in ["o", "k <tool", "_call>{\"name\": \"f\", ", "\"arguments\": {}}</tool_", "call> bye"]:
        text, calls = parser.push(piece)
        out, done = out + text, done + calls
    assert out + parser.flush() == "ok  bye" and [c.name for c in done] == ["f"]


# ---- sampling controls ------------------------------------------------------------------------

def test_penalties_and_bias_change_greedy_output(client, engine):
    base = {"model": MODEL, "prompt": "aaaa", "max_tokens": 12, "temperature": 0,
            "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(**base, logprobs=0).choices[0]
    (first,) = engine.tokenizer.encode(plain.logprobs.tokens[0], add_special_tokens=False)
    banned = client.completions.create(**base, logprobs=0, logit_bias={str(first): -100}).choices[0]
    assert engine.tokenizer.encode(banned.logprobs.tokens[0], add_special_tokens=False) != [first]
    plain = plain.text
    outputs = {plain}
    for kwargs in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        text = client.completions.create(**base, **kwargs).choices[0].text
        outputs.add(text)
    repeated = client.completions.create(**{**base, "extra_body": {"ignore_eos": True, "repetition_penalty": 5.0,
                                                                   "min_p": 0.1}}).choices[0].text
    outputs.add(repeated)
    assert len(outputs) > 1


def test_penalty_math():
    from engine.sampling import SamplingParams, apply_controls

    class Row:
        params = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0, repetition_penalty=2.0,
                                logit_bias={3: 5.0})
        prompt, generated, constraint, generator = [0], [1, 1], None, None

    out = apply_controls(torch.tensor([2.0, -2.0, 1.0, 0.0]), Row)
    # token 0: prompt only -> 2/2; token 1: -2*2 - 0.5*2 - 1; token 2 untouched; token 3: bias
    assert out.tolist() == pytest.approx([1.0, -6.0, 1.0, 5.0])


# ---- unsupported fields -----------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body", "named"), [
    ("/v1/chat/completions", {"audio": {"voice": "x"}, "modalities": ["audio"]}, ["audio", "modalities"]),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, ["functions"]),
    ("/v1/chat/completions", {"frobnicate": 1}, ["frobnicate"]),
    ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, ["stream_options"]),
    ("/v1/chat/completions", {"top_logprobs": 2}, ["top_logprobs"]),
    ("/v1/chat/completions", {"tool_choice": "required"}, ["tool_choice"]),
    ("/v1/completions", {"suffix": "x", "best_of": 2}, ["suffix", "best_of"]),
    ("/v1/completions", {"max_tokens": 0}, ["max_tokens"]),
    ("/v1/completions", {"response_format": {"type": "json_object"}}, ["response_format"]),
])
def test_unsupported_fields_are_400_and_named(base, path, body, named):
    payload = {"messages": USER} if "chat" in path else {"prompt": "a"}
    r = httpx.post(base + path, json={**payload, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert all(name in message for name in named), message


def test_null_fields_count_as_absent(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, extra_body={"audio": None})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_tokenize_detokenize(base):
    r = httpx.post(base + "/tokenize", json={"prompt": "hi there", "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] > 0 and len(r["token_strs"]) == r["count"]
    back = httpx.post(base + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == "hi there"
    chat = httpx.post(base + "/tokenize", json={"messages": USER}).json()
    assert chat["count"] > r["count"]
    assert httpx.post(base + "/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert httpx.post(base + "/tokenize", json={}).status_code == 400


def test_harmony_tools_are_refused_with_a_reason(engine):
    from fastapi.testclient import TestClient

    harmony = "{% if tools %}{% endif %}{% for m in messages %}<|start|>{{ m.content }}<|channel|>{% endfor %}"
    with TestClient(make_app(engine, chat_template=harmony)) as c:
        r = c.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER], "max_tokens": 2})
        assert r.status_code == 400 and "harmony" in r.json()["error"]["message"]
        assert c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200
