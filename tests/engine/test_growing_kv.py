"""The in-place KV layer: the same keys/values as transformers' DynamicLayer, without a copy per step."""

from __future__ import annotations

import torch
from transformers import DynamicCache, GptOssConfig, OlmoeConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from engine.kv_rows import GrowingLayer, growing_cache


def _states(gen, n, batch=2, heads=3, dim=5):
    return torch.randn(batch, heads, n, dim, generator=gen), torch.randn(batch, heads, n, 2 * dim, generator=gen)


def _same(a: DynamicLayer, b: DynamicLayer) -> None:
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert a.get_seq_length() == b.get_seq_length()


def test_appends_equal_dynamic_layer_and_reallocate_rarely():
    gen = torch.Generator().manual_seed(0)
    ref, grow = DynamicLayer(), GrowingLayer()
    k, v = _states(gen, 7)  # a prefill, then one token per step
    ref.update(k, v)
    grow.update(k, v)
    buffers = set()
    for _ in range(600):
        k, v = _states(gen, 1)
        rk, rv = ref.update(k, v)
        gk, gv = grow.update(k, v)
        assert torch.equal(rk, gk) and torch.equal(rv, gv)
        buffers.add(grow._buffers["keys"].data_ptr())
    _same(ref, grow)
    # 1/8 headroom per reallocation: about log(607 / 32) / log(9 / 8) = 25 buffers, where concatenation makes 600
    assert len(buffers) <= 30, len(buffers)
    used = (grow.keys.numel() + grow.values.numel()) * 4
    per_position = used // grow.get_seq_length()
    assert grow.held_bytes() <= per_position * (grow.get_seq_length() * 9 / 8 + 32)


def test_outside_assignments_are_followed():
    """Row selection, trimming from the left, crop and merges replace keys/values; appends stay exact."""
    gen = torch.Generator().manual_seed(1)
    ref, grow = DynamicLayer(), GrowingLayer()
    for layer in (ref, grow):
        layer.update(*_states(torch.Generator().manual_seed(2), 40))
    edits = [
        lambda layer: layer.crop(-5),  # a view of the same buffer: later appends overwrite the cut positions
        lambda layer: (setattr(layer, "keys", layer.keys[..., 3:, :]), setattr(layer, "values", layer.values[..., 3:, :])),
        lambda layer: layer.batch_select_indices(torch.tensor([1])),
        lambda layer: layer.batch_repeat_interleave(2),
    ]
    for edit in edits:
        edit(ref)
        edit(grow)
        used = (grow.keys.numel() + grow.values.numel()) * 4
        if grow.keys.data_ptr() != grow._buffers["keys"].data_ptr():  # replaced: held is the new tensors
            assert grow.held_bytes() == used
        else:  # a view of the buffer (crop): held is the buffer
            assert grow.held_bytes() == sum(b.numel() * 4 for b in grow._buffers.values()) > used
        for _ in range(3):
            k, v = _states(gen, 1, batch=ref.keys.shape[0])
            ref.update(k, v)
            grow.update(k, v)
            _same(ref, grow)


def test_growing_cache_swaps_only_full_attention_layers():
    olmoe = OlmoeConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=16, num_experts=4, num_experts_per_tok=2, vocab_size=64)
    assert all(type(layer) is GrowingLayer for layer in growing_cache(olmoe).layers)
    gptoss = GptOssConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                          vocab_size=64, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2)
    types = [type(layer) for layer in growing_cache(gptoss).layers]
    assert types == [DynamicSlidingWindowLayer, GrowingLayer] * 2, types
    plain = [type(layer) for layer in DynamicCache(config=gptoss).layers]
    assert plain == [DynamicSlidingWindowLayer, DynamicLayer] * 2


def _decode(prompts):
    from engine import Engine
    from engine.generation import SamplingParams

    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=2)
    with Engine.from_pretrained(None, device="cpu", progress=False) as eng:
        events = [(ev.request_id, ev.token_id, ev.logprob, ev.top_logprobs)
                  for ev in eng.generate(prompts, params) if ev.token_id is not None]
    return sorted(events, key=lambda e: e[0])


def test_engine_decode_equals_the_concatenating_cache(monkeypatch):
    """Batched greedy decode with rows of different lengths: the same tokens and log-probabilities
    (bit for bit) with the in-place layers as with transformers' own DynamicCache."""
    from engine import generation

    prompts = [[11, 12, 13, 14, 15, 16, 17], [21, 22], list(range(30, 90))]
    grown = _decode(prompts)
    monkeypatch.setattr(generation, "growing_cache", lambda config: DynamicCache(config=config))
    assert _decode(prompts) == grown
