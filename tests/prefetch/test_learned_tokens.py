"""The learned predictor's token part: expert counts per frequent token id, each request left out of
its own counts in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.prefetch_table import take_rows
from prefetch import build_predictor
from prefetch.learned import CANDIDATES, FEATURES, TOKEN_FEATURES, LearnedModel, token_index
from prefetch.training import (
    _RequestTokens,
    default_token_vocab,
    evaluate,
    holdout_split,
    kept_token_ids,
    train_learned,
)
from traces.simulate import SimConfig, build_schedule, capacities_for, simulate
from traces.synth import SynthConfig, synth_trace

SMALL = {"layers": 4, "experts": 16, "top_k": 2, "requests": 40, "prompt_len": 6, "decode_len": 24, "vocab": 48}


def _trace(token_weight: float, seed: int = 0):
    return synth_trace(SynthConfig(skew=0.6, locality=0.2, token_weight=token_weight, seed=seed, **SMALL))


def _fit(trace, held, tokens: bool, seed: int = 0):
    fit = ~held
    return train_learned(trace.experts[fit].astype(np.int64), trace.request[fit], trace.num_experts, 2, width=16,
                         epochs=8, phase=trace.phase[fit], seed=seed,
                         tokens=trace.tokens[fit] if tokens else None)


def _f1(model, trace, held, tokens: bool) -> float:
    return evaluate(model, trace.experts[held], trace.request[held], 1, phase=trace.phase[held],
                    rows=trace.phase[held] == 1, tokens=trace.tokens[held] if tokens else None)[1]["f1"]


@pytest.fixture(scope="module")
def token_routed():
    trace = _trace(0.8)
    held = holdout_split(trace.request, 0.25)
    return trace, held, _fit(trace, held, True), _fit(trace, held, False)


def test_token_part_learns_routing_that_depends_on_the_token(token_routed):
    # 80 % of each row's routing mass follows its token's own popularity: the routing history
    # carries little of it, the token's counts most.
    trace, held, with_ids, without = token_routed
    assert 0 < with_ids.token_vocab <= 48 and without.token_vocab == 0
    f1 = {"ids": _f1(with_ids, trace, held, True), "none": _f1(without, trace, held, False)}
    assert f1["ids"] > f1["none"] + 0.15, f1
    # the learned scales kept the counts (well above 0) where they carry the signal
    assert float(with_ids.token_scale.detach()[0, :3].mean()) > 0.3


def test_token_part_costs_nothing_where_ids_carry_no_signal():
    trace = _trace(0.0)
    held = holdout_split(trace.request, 0.25)
    f1_ids = _f1(_fit(trace, held, True), trace, held, True)
    f1_none = _f1(_fit(trace, held, False), trace, held, False)
    assert f1_ids >= f1_none - 0.02, (f1_ids, f1_none)


def test_token_feature_by_hand_and_leave_one_out():
    model = LearnedModel(2, 4, 2, 1, token_vocab=8)
    with torch.no_grad():
        model.freq.copy_(torch.full((2, 4), 0.5))  # K = 2 of 4 experts: every share 1/2, prior 1/4
        model.token_counts[3, 0] = torch.tensor([2.0, 2.0, 0.0, 0.0])  # token row 3: two rows, both used 0 and 1
        model.token_rows[3] = 2.0
    tok = torch.tensor([3, 5, -1])
    feat = model.token_feature(tok)
    # (count + K * prior) / (K * rows + K) = (2 + 0.5) / 6 for experts 0, 1 and 0.5 / 6 for 2, 3
    want = torch.log(torch.tensor([2.5, 2.5, 0.5, 0.5]) / 6) - np.log(0.25)
    assert torch.allclose(feat[0, 0], want)
    assert torch.equal(feat[1], torch.zeros(2, 4))  # a token never seen: the layer's shares, no change
    assert torch.equal(feat[2], torch.zeros(2, 4))  # no id
    # Leaving out a row that used experts 0 and 1: one row left, (1 + 0.5) / 4 and 0.5 / 4.
    own = torch.zeros(3, 2, 4)
    own[0, 0, :2] = 1.0
    loo = model.token_feature(tok, own)
    assert torch.allclose(loo[0, 0], torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]) / 4) - np.log(0.25))
    assert torch.equal(loo[1:], feat[1:])  # rows with no routing of their own, or no id: unchanged


def test_kept_ids_lookup_and_defaults():
    # the 3 most frequent ids (9 four times; 2 and 7 twice; 5 once), ties to the smaller id, sorted
    kept = kept_token_ids(np.array([9, 7, 9, 2, 5, 9, -1, 7, 2, 9, -1, -1]), 3)
    assert kept.tolist() == [2, 7, 9]
    assert token_index(kept, np.array([9, 5, -1, 2, 100, 7])).tolist() == [2, -1, -1, 0, -1, 1]
    assert token_index(kept, None) is None and token_index(np.zeros(0, np.int64), np.array([3])) is None
    assert default_token_vocab(4, 32) == 16384
    assert 256 <= default_token_vocab(58, 256) < 4096  # many layers x experts: fewer ids
    with pytest.raises(ValueError, match="token_vocab"):
        LearnedModel(4, 16, 2, 1, token_vocab=-1)
    # rows of one request with the same token are left out together; another request's are not
    groups = _RequestTokens(np.array([0, 0, 0, 1, 1]), np.array([1, 1, 0, 1, -1]), np.arange(5))
    model = LearnedModel(2, 4, 1, 1)
    own, rows = groups.routing(model, np.array([[[0], [1]], [[1], [2]], [[0], [3]], [[2], [2]], [[3], [0]]]),
                               np.array([0, 3, 4]))
    assert rows.tolist() == [2.0, 1.0, 0.0]
    assert own[0].tolist() == [[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]
    assert own[1].tolist() == [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]] and not own[2].any()
    with pytest.raises(ValueError, match="tokens has"):
        train_learned(np.zeros((4, 3, 2), np.int64), np.zeros(4), 16, 1, tokens=np.zeros(3))


def test_live_predict_with_tokens_agrees_with_predict_array(token_routed, tmp_path):
    trace, held, model, _ = token_routed
    model.save(tmp_path / "p.safetensors")
    loaded = LearnedModel.load(tmp_path / "p.safetensors")
    assert loaded.config()["features"] == TOKEN_FEATURES and loaded.token_vocab == model.token_vocab
    assert all(torch.equal(model.state_dict()[k], loaded.state_dict()[k]) for k in model.state_dict())
    rows = np.flatnonzero(held)[:60]
    e64, request, phase, tokens = trace.experts[rows].astype(np.int64), trace.request[rows], trace.phase[rows], \
        trace.tokens[rows]
    want = loaded.predict_array(e64, request, 1, phase=phase, tokens=tokens)
    blind = loaded.predict_array(e64, request, 1, phase=phase)
    assert not np.array_equal(want[0], blind[0])  # the ids change the guesses
    live = build_predictor("learned", num_layers=4, num_experts=16, top_k=2, lookahead=1, model=loaded)
    checked = 0
    for r in np.unique(request):
        mine = np.flatnonzero(request == r)
        prompt, decode = mine[phase[mine] == 0], mine[phase[mine] == 1]
        live.begin_request()
        for step in ([prompt] if len(prompt) else []) + [[i] for i in decode]:
            live.reset()
            live.observe_tokens(tokens[step])
            for layer in range(4):
                live.observe(layer, None, torch.from_numpy(e64[step, layer]))
                if len(step) > 1 or layer == 3:
                    continue
                got = [(k.expert, s) for k, s in live.predict(layer) if k.layer == layer + 1]
                assert len(got) == CANDIDATES * 2
                assert [e for e, _ in got[:2]] == want[0][step[0], layer].tolist()
                assert [s for _, s in got[:2]] == pytest.approx(want[1][step[0], layer].tolist(), rel=1e-4)
                checked += 1
    assert checked > 20


def test_files_without_a_token_part_still_load(tmp_path):
    model = LearnedModel(4, 16, 2, 1, width=8)
    model.save(tmp_path / "plain.safetensors")
    loaded = LearnedModel.load(tmp_path / "plain.safetensors")
    assert loaded.config()["features"] == FEATURES and loaded.token_vocab == 0


def test_simulator_hands_the_ids_to_the_predictor(token_routed, tmp_path):
    """The replay calls observe_tokens: with ids the learned predictor's guesses, and hit rate, improve."""
    trace, held, model, _ = token_routed
    path = tmp_path / "p.safetensors"
    model.save(path)
    test = take_rows(trace, held)  # the requests the model did not train on
    caps, scope = capacities_for(test, capacity_fraction=0.25)
    schedule = build_schedule(test, per_token=True)
    cfg = SimConfig(policy="lru", capacities=tuple(caps), scope=scope, prefetch="learned", predictor_path=str(path),
                    expert_bytes=1 << 20, link_gbps=25.0, layer_compute_us=2000.0, per_token=True)
    with_ids = simulate(test, cfg, schedule)
    blind = take_rows(test, np.ones(len(test.request), dtype=bool))
    blind.tokens = None
    without = simulate(blind, cfg, build_schedule(blind, per_token=True))
    assert with_ids.hit_rate > without.hit_rate + 0.03, (with_ids.hit_rate, without.hit_rate)
