"""The generation loop on tiny random models: parity with transformers' generate, continuous
batching (join, leave, abort), sampling, streaming text with stop strings."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
)

from engine import generation
from engine.detok import IncrementalDetokenizer, StopStringHolder
from engine.generation import BatchGenerator, SamplingParams, StepInfo, generate

VOCAB = 96
COMMON = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 16}


def _config(arch: str, vocab: int = VOCAB):
    if arch == "olmoe":
        return OlmoeConfig(vocab_size=vocab, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, **COMMON)
    if arch == "mixtral":
        return MixtralConfig(vocab_size=vocab, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                             **COMMON)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(vocab_size=vocab, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=16, head_dim=8, **COMMON)
    if arch == "gpt_oss":  # layer 0 slides over 4 positions, shorter than the prompts below
        return GptOssConfig(vocab_size=vocab, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                            sliding_window=4, head_dim=8, **COMMON)
    if arch == "deepseek_v3":  # MLA: the cache holds latents, keys and values of different widths
        return DeepseekV3Config(vocab_size=vocab, num_key_value_heads=4, moe_intermediate_size=16,
                                n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4,
                                qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1, **COMMON)
    raise AssertionError(arch)


ARCHS = ["olmoe", "mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"]
_MODELS: dict[tuple[str, int], torch.nn.Module] = {}


def tiny_model(arch: str = "olmoe", vocab: int = VOCAB):
    key = (arch, vocab)
    if key not in _MODELS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(arch, vocab), dtype=torch.float32).eval()
        # No EOS unless a test sets one, so runs have the length we ask for.
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        _MODELS[key] = model
    return _MODELS[key]


PROMPTS = [[5, 17, 33, 2, 9, 41, 7, 60, 11], [3, 8], [70, 71, 12, 19, 4, 4]]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0)


_REFERENCE: dict[tuple[int, tuple[int, ...]], list[int]] = {}


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy tokens; computed once per model and prompt (a greedy run of n tokens
    is the first n of a longer one)."""
    key = (id(model), tuple(prompt))
    if len(_REFERENCE.get(key, ())) < n:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=max(n, 32), do_sample=False, pad_token_id=0)
        _REFERENCE[key] = out[0, len(prompt):].tolist()
    return _REFERENCE[key][:n]


def run(gen: BatchGenerator, joins: dict[int, list[tuple]] | None = None, max_steps: int = 200):
    """Step ``gen`` to completion; ``joins[step]`` lists ``add`` arguments to apply before that step.
    Returns (tokens by request, text by request, events by request)."""
    joins = joins or {}
    tokens, texts, events = {}, {}, {}
    for step in range(max_steps):
        for args in joins.get(step, []):
            gen.add(*args)
        if not gen.has_work and step > max(joins, default=-1):
            break
        for e in gen.step():
            events.setdefault(e.request_id, []).append(e)
            if e.token_id is not None:
                tokens.setdefault(e.request_id, []).append(e.token_id)
            texts[e.request_id] = texts.get(e.request_id, "") + e.text
    return tokens, texts, events


# ---- parity with transformers ---------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_single_prompt_greedy_matches_hf_generate(arch):
    model = tiny_model(arch)
    tokens, _, events = run(BatchGenerator(model, None, "cpu"), {0: [("r", PROMPTS[0], GREEDY)]})
    assert tokens["r"] == hf_greedy(model, PROMPTS[0], 32)
    assert events["r"][-1].finish_reason == "length"


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_different_lengths_matches_each_alone(arch):
    # Float32 and left padding that is fully masked: the batched forward computes the same
    # numbers per row up to summation order, far below any argmax gap, so tokens are equal.
    model = tiny_model(arch)
    gen = BatchGenerator(model, None, "cpu")
    tokens, _, _ = run(gen, {0: [(str(i), p, GREEDY) for i, p in enumerate(PROMPTS)]})
    for i, p in enumerate(PROMPTS):
        assert tokens[str(i)] == hf_greedy(model, p, 32), f"prompt {i}"


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss", "deepseek_v3"])
def test_sequences_joining_and_leaving_midway_match_alone(arch):
    model = tiny_model(arch)
    short = SamplingParams(max_tokens=6, temperature=0.0)
    gen = BatchGenerator(model, None, "cpu")
    # "a" leaves early (its rows and the leading padding columns are dropped), "b" and "c" join
    # a running batch whose cache is longer or shorter than their prompt.
    tokens, _, _ = run(gen, {0: [("a", PROMPTS[0], short)], 3: [("b", PROMPTS[1], GREEDY)],
                             9: [("c", PROMPTS[2], GREEDY)]})
    assert tokens["a"] == hf_greedy(model, PROMPTS[0], 6)
    assert tokens["b"] == hf_greedy(model, PROMPTS[1], 32)
    assert tokens["c"] == hf_greedy(model, PROMPTS[2], 32)


def test_reprefill_fallback_gives_same_tokens(monkeypatch):
    # Cache layers that cannot be row-merged make a join re-prefill the whole batch.
    monkeypatch.setattr(generation, "is_mergeable", lambda cache: False)
    model = tiny_model("gpt_oss")
    gen = BatchGenerator(model, None, "cpu")
    tokens, _, _ = run(gen, {0: [("a", PROMPTS[0], GREEDY)], 4: [("b", PROMPTS[1], GREEDY)]})
    assert tokens["a"] == hf_greedy(model, PROMPTS[0], 32)
    assert tokens["b"] == hf_greedy(model, PROMPTS[1], 32)


def test_every_sequence_gains_one_token_per_step_and_batch_is_capped():
    gen = BatchGenerator(tiny_model(), None, "cpu", max_batch_size=2)
    for i, p in enumerate(PROMPTS):
        gen.add(str(i), p, SamplingParams(max_tokens=3, temperature=0.0))
    assert (gen.num_waiting, gen.num_running) == (3, 0)
    first = gen.step()
    assert sorted(e.request_id for e in first) == ["0", "1"]
    assert (gen.num_waiting, gen.num_running) == (1, 2)
    second = gen.step()
    assert sorted(e.request_id for e in second) == ["0", "1"]
    gen.step()  # "0" and "1" reach max_tokens and leave
    assert (gen.num_waiting, gen.num_running) == (1, 0)
    assert [e.request_id for e in gen.step()] == ["2"]


# ---- sampling -------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    model = tiny_model()
    p = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, top_k=40, seed=1234)
    alone = run(BatchGenerator(model, None, "cpu"), {0: [("x", PROMPTS[0], p)]})[0]["x"]
    again = run(BatchGenerator(model, None, "cpu"), {0: [("x", PROMPTS[0], p)]})[0]["x"]
    crowd = run(BatchGenerator(model, None, "cpu"), {
        0: [("y", PROMPTS[1], SamplingParams(max_tokens=30, temperature=1.5)),
            ("z", PROMPTS[2], SamplingParams(max_tokens=5, temperature=0.7, seed=9))],
        2: [("x", PROMPTS[0], p)],
    })[0]["x"]
    assert alone == again == crowd
    other_seed = run(BatchGenerator(model, None, "cpu"),
                     {0: [("x", PROMPTS[0], SamplingParams(max_tokens=24, seed=4321))]})[0]["x"]
    assert other_seed != alone


def test_top_k_1_is_greedy():
    model = tiny_model()
    p = SamplingParams(max_tokens=32, temperature=1.3, top_k=1, seed=5)
    tokens, _, _ = run(BatchGenerator(model, None, "cpu"), {0: [("r", PROMPTS[2], p)]})
    assert tokens["r"] == hf_greedy(model, PROMPTS[2], 32)


@pytest.mark.parametrize("bad, message", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"seed": -3}, "seed"), ({"stop": ("",)}, "stop"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"), ({"max_tokens": True}, "max_tokens"),
])
def test_sampling_params_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_sampling_params_accept_lists_and_freeze_them():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[3])
    assert p.stop == ("a", "b") and p.stop_token_ids == (3,)
    assert SamplingParams(stop="x").stop == ("x",)


# ---- finishing ------------------------------------------------------------------------------

def test_max_tokens_finishes_with_length():
    _, _, events = run(BatchGenerator(tiny_model(), None, "cpu"),
                       {0: [("r", PROMPTS[1], SamplingParams(max_tokens=5, temperature=0.0))]})
    ev = events["r"]
    assert [e.finished for e in ev] == [False] * 4 + [True]
    assert ev[-1].finish_reason == "length"
    assert (ev[-1].num_prompt_tokens, ev[-1].num_generated_tokens) == (2, 5)


def test_eos_and_stop_token_ids_finish_with_stop():
    model = tiny_model()
    ref = hf_greedy(model, PROMPTS[0], 32)
    k = 7
    target = ref[k]
    expected_len = ref.index(target) + 1  # first occurrence ends it
    for params in (SamplingParams(max_tokens=32, temperature=0.0, stop_token_ids=(target,)),):
        _, _, events = run(BatchGenerator(model, None, "cpu"), {0: [("r", PROMPTS[0], params)]})
        assert events["r"][-1].finish_reason == "stop"
        assert events["r"][-1].token_id == target
        assert events["r"][-1].num_generated_tokens == expected_len
    model.generation_config.eos_token_id = [VOCAB + 5, target]  # a list, as many checkpoints have
    try:
        gen = BatchGenerator(model, None, "cpu")
        _, _, events = run(gen, {0: [("r", PROMPTS[0], GREEDY),
                                     ("i", PROMPTS[0], SamplingParams(max_tokens=32, temperature=0.0,
                                                                      ignore_eos=True))]})
    finally:
        model.generation_config.eos_token_id = None
    assert events["r"][-1].finish_reason == "stop" and len(events["r"]) == expected_len
    assert events["i"][-1].finish_reason == "length" and len(events["i"]) == 32


def test_remove_aborts_and_frees_rows():
    model = tiny_model("gpt_oss")
    gen = BatchGenerator(model, None, "cpu")
    for i, p in enumerate(PROMPTS):
        gen.add(str(i), p, GREEDY)
    tokens: dict[str, list[int]] = {}
    for _ in range(4):
        for e in gen.step():
            tokens.setdefault(e.request_id, []).append(e.token_id)
    assert gen.num_running == 3 and gen._kv.num_rows == 3
    longest = gen._kv.length
    ev = gen.remove("0")  # the longest prompt: its padding-free prefix columns go too
    assert ev.finished and ev.finish_reason == "abort" and ev.token_id is None
    assert ev.num_generated_tokens == 4
    assert gen.num_running == 2 and gen._kv.num_rows == 2
    assert gen._kv.length < longest
    assert gen.remove("0") is None and gen.remove("nope") is None
    while gen.has_work:
        for e in gen.step():
            tokens[e.request_id].append(e.token_id)
    assert tokens["1"] == hf_greedy(model, PROMPTS[1], 32)
    assert tokens["2"] == hf_greedy(model, PROMPTS[2], 32)
    assert gen._kv is None


def test_remove_waiting_request():
    gen = BatchGenerator(tiny_model(), None, "cpu")
    gen.add("w", PROMPTS[0], GREEDY)
    assert gen.remove("w").finish_reason == "abort"
    assert not gen.has_work and gen.step() == []


def test_add_validation():
    gen = BatchGenerator(tiny_model(), None, "cpu", max_model_len=20)
    with pytest.raises(ValueError, match="at least one token"):
        gen.add("a", [], GREEDY)
    with pytest.raises(ValueError, match="context length of 20"):
        gen.add("a", [1] * 10, SamplingParams(max_tokens=11))
    with pytest.raises(ValueError, match="token ids must be in"):
        gen.add("a", [VOCAB], GREEDY)
    with pytest.raises(ValueError, match="need a tokenizer"):
        gen.add("a", [1], SamplingParams(stop=("x",)))
    gen.add("a", [1] * 10, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="already in use"):
        gen.add("a", [1], GREEDY)


# ---- step_context ---------------------------------------------------------------------------

def test_step_context_sees_every_forward_with_row_info():
    infos: list[StepInfo] = []
    depth = []

    @contextlib.contextmanager
    def ctx(info):
        infos.append(info)
        depth.append(1)
        yield
        depth.pop()

    model = tiny_model()
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(len(depth)))
    try:
        gen = BatchGenerator(model, None, "cpu", step_context=ctx)
        gen.add("a", PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0))
        gen.add("b", PROMPTS[1], SamplingParams(max_tokens=3, temperature=0.0))
        gen.step()
        gen.step()
    finally:
        hook.remove()
    assert calls == [1, 1]  # every forward ran inside the context
    prefill, decode = infos
    width = len(PROMPTS[0])
    assert prefill.phase == 0 and decode.phase == 1
    assert prefill.valid.shape == prefill.request.shape == prefill.position.shape == prefill.tokens.shape == (
        2 * width,)
    assert int(prefill.valid.sum()) == len(PROMPTS[0]) + len(PROMPTS[1])
    a, b = gen.sequence_id("a"), gen.sequence_id("b")
    assert prefill.request.tolist() == [a] * width + [-1] * (width - 2) + [b] * 2
    assert prefill.position.tolist() == list(range(width)) + [-1] * (width - 2) + [0, 1]
    assert prefill.tokens[prefill.valid].tolist() == PROMPTS[0] + PROMPTS[1]
    assert decode.valid.tolist() == [True, True] and decode.request.tolist() == [a, b]
    assert decode.position.tolist() == [width, 2]


def test_generate_helper_streams_all_requests():
    model = tiny_model()
    events = list(generate(model, None, "cpu", PROMPTS[:2], SamplingParams(max_tokens=4, temperature=0.0)))
    assert [e.request_id for e in events if e.finished] == ["0", "1"]
    assert [e.token_id for e in events if e.request_id == "1"] == hf_greedy(model, PROMPTS[1], 4)


# ---- text -----------------------------------------------------------------------------------

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "über café naïve déjà vu — 日本語のテキスト 🙂",
    "stop here. stop there! never stop streaming text",
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_incremental_detokenizer_never_splits_characters(tokenizer):
    text = "naïve 日本語 🙂 fox"
    ids = tokenizer.encode(text)
    # Byte-level tokens: one per byte somewhere in the multi-byte characters.
    assert len(ids) > len(text.split())
    prompt = tokenizer.encode("the ")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_decode_stream_and_window_fallback_agree(tokenizer):
    class NoBackend:  # a tokenizer without tokenizers' DecodeStream: the decode-window path
        def __init__(self, tok):
            self.decode = tok.decode

    text = "über café 日本語 🙂 stop"
    ids, prompt = tokenizer.encode(text), tokenizer.encode("the ")
    streamed = IncrementalDetokenizer(tokenizer, prompt)
    windowed = IncrementalDetokenizer(NoBackend(tokenizer), prompt)
    assert streamed._stream is not None and windowed._stream is None
    out = {}
    for name, detok in (("stream", streamed), ("window", windowed)):
        deltas = [detok.push(t) for t in ids] + [detok.flush()]
        assert not any("\ufffd" in d for d in deltas)
        out[name] = "".join(deltas)
    assert out["stream"] == out["window"] == text


def test_stop_string_holder_holds_possible_prefixes():
    h = StopStringHolder(("STOP", "end."))
    assert h.push("abc S") == "abc "
    assert h.push("T") == ""
    assert h.push("x en") == "STx "
    assert h.push("d") == ""
    assert h.push(".tail") == ""
    assert h.hit and h.flush() == ""
    h = StopStringHolder(("STOP",))
    assert h.push("ST") == ""
    assert h.flush() == "ST"  # finished without a hit: the held text was real output
    h = StopStringHolder(("bc", "abcd"))
    assert h.push("xabcd") == "x" and h.hit  # the earliest occurrence wins


def test_stop_strings_cut_streamed_text(tokenizer):
    model = tiny_model("olmoe", vocab=len(tokenizer))
    prompt = tokenizer.encode("the quick brown")
    free = SamplingParams(max_tokens=40, temperature=0.0)
    _, texts, _ = run(BatchGenerator(model, tokenizer, "cpu"), {0: [("r", prompt, free)]})
    full = texts["r"]
    assert len(full) >= 12

    # A stop string from the middle of the text, usually spanning several tokens.
    start = len(full) // 2
    stop = full[start:start + 4]
    expected = full[: full.find(stop)]
    gen = BatchGenerator(model, tokenizer, "cpu")
    gen.add("r", prompt, SamplingParams(max_tokens=40, temperature=0.0, stop=("never-there", stop)))
    streamed = ""
    while gen.has_work:
        for e in gen.step():
            streamed += e.text
            assert expected.startswith(streamed)  # no partial stop string ever leaks
            last = e
    assert streamed == expected
    assert last.finish_reason == "stop"

    # A stop string whose start matches the end of the text but never completes: the held
    # tail is released when the sequence ends by length.
    tail_stop = full[-2:] + "\x00"
    _, texts, events = run(BatchGenerator(model, tokenizer, "cpu"),
                           {0: [("r", prompt, SamplingParams(max_tokens=40, temperature=0.0,
                                                             stop=(tail_stop,)))]})
    assert texts["r"] == full and events["r"][-1].finish_reason == "length"


def test_tokenizer_eos_is_used_and_not_emitted(tokenizer):
    model = tiny_model("olmoe", vocab=len(tokenizer))
    prompt = tokenizer.encode("the quick brown")
    ref = hf_greedy(model, prompt, 20)
    fake_eos = ref[5]
    gen = BatchGenerator(model, tokenizer, "cpu")
    gen.eos_token_ids = frozenset({fake_eos})
    _, texts, events = run(gen, {0: [("r", prompt, SamplingParams(max_tokens=20, temperature=0.0))]})
    assert events["r"][-1].finish_reason == "stop"
    generated = ref[: ref.index(fake_eos)]
    assert texts["r"] == tokenizer.decode(generated, skip_special_tokens=True)
    assert tokenizer.eos_token_id in BatchGenerator(model, tokenizer, "cpu").eos_token_ids


# ---- log-probabilities and scoring ----------------------------------------------------------

def test_logprobs_and_prompt_logprobs_equal_the_models_in_a_padded_batch():
    model = tiny_model()
    gen = BatchGenerator(model, None, "cpu")
    scored = SamplingParams(max_tokens=0, prompt_logprobs=2)
    sampled = SamplingParams(max_tokens=3, temperature=0.0, logprobs=1)
    _, _, events = run(gen, {0: [("long", PROMPTS[0], scored), ("short", PROMPTS[1], scored),
                                 ("gen", PROMPTS[2], sampled)]})
    for rid, prompt in (("long", PROMPTS[0]), ("short", PROMPTS[1])):
        (event,) = events[rid]
        assert event.finished and event.finish_reason == "length" and event.token_id is None
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        got = event.prompt_logprobs
        assert got[0] is None and len(got) == len(prompt)
        for j in range(1, len(prompt)):
            assert got[j][0] == pytest.approx(float(logp[j - 1, prompt[j]]), abs=1e-4)
            assert [t for t, _ in got[j][1]] == torch.topk(logp[j - 1], 2).indices.tolist()
    tokens = [e.token_id for e in events["gen"]]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([PROMPTS[2] + tokens])).logits[0].float(), dim=-1)
    for k, e in enumerate(events["gen"]):
        row = logp[len(PROMPTS[2]) - 1 + k]
        assert e.logprob == pytest.approx(float(row[e.token_id]), abs=1e-4)
        assert e.top_logprobs[0][0] == e.token_id  # greedy


def test_zero_max_tokens_needs_prompt_logprobs():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1.0})
