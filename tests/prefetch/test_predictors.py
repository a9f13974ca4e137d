"""Predictor semantics: the registry's common kwargs, oracle, prev, freq, eam, and the learned model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache import ExpertKey
from prefetch import build_predictor, predictor_names
from prefetch.base import is_offline_only
from prefetch.learned import CANDIDATES, LearnedModel, previous_rows
from prefetch.training import compare, evaluate, freq_baseline, holdout_split, prev_baseline, train_learned
from tests.prefetch.synthetic import synthetic_routing

COMMON = {"num_layers": 3, "num_experts": 4, "top_k": 1, "lookahead": 2, "routers": None, "path": None, "trace": None}


def feed(p, steps):
    """steps: list of per-layer expert tuples (one token per step)."""
    for row in steps:
        p.reset()
        for layer, e in enumerate(row):
            p.observe(layer, None, torch.tensor([[e]]))


@pytest.mark.parametrize("name", ["none", "prev", "freq", "eam"])
def test_factories_accept_the_common_kwargs(name):
    p = build_predictor(name, **COMMON, something_new=1)
    p.begin_request()
    feed(p, [(0, 1, 2)])
    assert all(k.layer > 0 for k, _ in p.predict(0))


def test_registry_names_and_clear_errors():
    assert {"none", "prev", "freq", "eam", "learned", "pregate", "oracle"} <= set(predictor_names())
    assert is_offline_only("oracle") and "oracle" not in predictor_names(online_only=True)
    with pytest.raises(ValueError, match="live engine"):
        build_predictor("pregate", **COMMON)
    with pytest.raises(ValueError, match="predictor-path"):
        build_predictor("learned", **COMMON)
    with pytest.raises(ValueError, match="simulator"):
        build_predictor("oracle", **COMMON)
    with pytest.raises(ValueError, match="known predictors"):
        build_predictor("nope")


def test_oracle_predicts_exactly_the_future():
    experts, request, _ = synthetic_routing(requests=3, tokens=5, layers=4, experts=8, top_k=2)
    kw = dict(COMMON, num_layers=4, num_experts=8, top_k=2, lookahead=3)
    result = evaluate(build_predictor("oracle", **dict(kw, trace=experts)), experts, request, 3)
    perfect = {"precision": 1.0, "recall": 1.0, "f1": 1.0, "wasted": 0.0, "covered": 1.0}
    assert all(v == perfect for v in result.values())
    # Batched forwards: rows 0-1 in one forward, then row 2.
    p = build_predictor("oracle", **dict(kw, trace=(experts, [[0, 1], [2]])))
    p.reset()
    p.observe(0, None, torch.from_numpy(experts[[0, 1], 0].astype(np.int64)))
    want = {ExpertKey(t, int(e)) for t in (1, 2, 3) for e in np.unique(experts[[0, 1], t])}
    assert {k for k, _ in p.predict(0)} == want
    p.reset()
    p.observe(0, None, torch.from_numpy(experts[[2], 0].astype(np.int64)))
    assert {k for k, s in p.predict(0) if s == 1.0} == {ExpertKey(1, int(e)) for e in experts[2, 1]}


def test_prev_repeats_the_previous_token_and_forgets_it_at_a_new_request():
    p = build_predictor("prev", **COMMON)
    feed(p, [(0, 1, 2)])
    p.reset()
    p.observe(0, None, torch.tensor([[3]]))
    assert p.predict(0) == [(ExpertKey(1, 1), 1.0), (ExpertKey(2, 2), 0.5)]
    p.begin_request()
    p.reset()
    p.observe(0, None, torch.tensor([[3]]))
    assert p.predict(0) == []


def test_freq_predicts_the_most_used_expert_of_each_layer():
    p = build_predictor("freq", **COMMON)
    feed(p, [(0, 1, 2), (0, 1, 3), (0, 0, 3)])
    assert p.predict(0) == [(ExpertKey(1, 1), pytest.approx(2 / 3)), (ExpertKey(2, 3), pytest.approx(1 / 3))]


def test_eam_follows_the_best_matching_past_request():
    # Two kinds of requests: layer 0 expert 0 -> layer 2 expert 1; layer 0 expert 3 -> layer 2 expert 2.
    bank_experts = np.array([[[0], [0], [1]], [[3], [3], [2]]])
    p = build_predictor("eam", **COMMON, bank=(bank_experts, np.array([0, 1])))
    p.begin_request()
    p.reset()
    p.observe(0, None, torch.tensor([[3]]))
    assert p.predict(0)[0][0] == ExpertKey(1, 3)
    p.observe(1, None, torch.tensor([[3]]))
    assert p.predict(1)[0][0] == ExpertKey(2, 2)
    # Finished requests join the bank online.
    q = build_predictor("eam", **COMMON)
    q.begin_request()
    feed(q, [(1, 2, 0)])
    q.begin_request()
    q.reset()
    q.observe(0, None, torch.tensor([[1]]))
    assert q.predict(0)[0][0] == ExpertKey(1, 2) and q.bank_len == 1


def test_previous_rows_respects_requests_and_prefill():
    experts = np.arange(4 * 2).reshape(4, 2, 1)
    request = np.array([5, 7, 5, 7])
    prev = previous_rows(experts, request, phase=np.array([0, 0, 1, 1]))
    assert prev[:, :, 0].tolist() == [[-1, -1], [-1, -1], [0, 1], [2, 3]]
    guess, prob = prev_baseline(experts, request, 1)
    assert guess[:, :, 0].tolist() == [[-1], [-1], [1], [3]] and prob[:, 0, 0].tolist() == [0, 0, 1, 1]


def test_metrics_by_hand():
    experts = np.array([[[0, 1], [2, 3]], [[0, 1], [2, 1]]])  # two rows of one request, L=2, K=2
    request = np.zeros(2, dtype=int)
    # prev: row 0 has no guess; row 1 guesses {2, 3} for layer 1 (probability 1), truth {2, 1}: 1 hit of 2
    # guesses, 4 true; both guesses are copied, one is wasted.
    assert evaluate(prev_baseline, experts, request, 1)[1] == pytest.approx(
        {"precision": 0.5, "recall": 0.25, "f1": 2 * 0.5 * 0.25 / 0.75, "wasted": 0.5, "covered": 0.25})
    # freq guesses {2 (0.9), 1 (0.2)}: 3 hits of 4; only expert 2 is copied (p >= 0.5), used by both rows.
    shares = np.array([[1.0, 0, 0, 0], [0, 0.2, 0.9, 0.1]])
    assert evaluate(freq_baseline(shares), experts, request, 1)[1] == pytest.approx(
        {"precision": 0.75, "recall": 0.75, "f1": 0.75, "wasted": 0.0, "covered": 0.5})


def test_holdout_is_the_last_requests():
    request = np.array([3, 3, 1, 1, 2, 2, 0])
    assert holdout_split(request, 0.5).tolist() == [False, False, False, False, True, True, True]
    with pytest.raises(ValueError):
        holdout_split(request, 1.0)


@pytest.fixture(scope="module")
def trained():
    experts, request, phase = synthetic_routing()
    held = holdout_split(request, 0.2)
    model = train_learned(experts[~held], request[~held], 16, 2, epochs=4, phase=phase[~held], seed=0)
    return model, experts[held], request[held], phase[held]


def test_learned_beats_both_baselines_on_structured_routing(trained):
    model, experts, request, phase = trained
    res = compare(model, experts, request, 2, phase=phase, rows=phase == 1)
    for d in (1, 2):
        assert res["learned"][d]["f1"] > res["prev"][d]["f1"] + 0.2
        assert res["learned"][d]["f1"] > res["freq"][d]["f1"] + 0.2


def test_learned_file_round_trip_and_online_equals_offline(trained, tmp_path):
    model, experts, request, phase = trained
    model.meta = {"heldout": {"1": {"f1": 0.5}}}
    path = tmp_path / "pred.safetensors"
    model.save(path)
    loaded = LearnedModel.load(path)
    assert loaded.meta == model.meta and loaded.config() == model.config()
    assert torch.equal(loaded.weight, model.weight)
    live = build_predictor("learned", num_layers=6, num_experts=16, top_k=2, lookahead=2, path=str(path))
    rows = phase == 1
    assert evaluate(live, experts, request, 2, rows=rows) == evaluate(loaded, experts, request, 2, phase=phase,
                                                                      rows=rows)
    with pytest.raises(ValueError, match="lookahead"):
        build_predictor("learned", num_layers=6, num_experts=16, top_k=2, lookahead=3, path=str(path))
    with pytest.raises(ValueError, match="num_experts"):
        build_predictor("learned", num_layers=6, num_experts=8, top_k=2, path=str(path))


def test_learned_with_hidden_states_trains_and_predicts():
    experts, request, _phase = synthetic_routing(requests=6, tokens=10, layers=4, experts=8)
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((len(request), 4, 5)).astype(np.float16)
    model = train_learned(experts, request, 8, 1, epochs=1, hidden=hidden)
    assert model.hidden_size == 5
    p = build_predictor("learned", num_layers=4, num_experts=8, lookahead=1, model=model)
    p.reset()
    p.observe(0, torch.from_numpy(hidden[:2, 0]), torch.from_numpy(experts[:2, 0].astype(np.int64)))
    assert 0 < len(p.predict(0)) <= CANDIDATES * 2 * 2  # guesses per routed expert x top_k x tokens
    narrow = build_predictor("learned", num_layers=4, num_experts=8, lookahead=1, model=model, candidates=1)
    narrow.reset()
    narrow.observe(0, torch.from_numpy(hidden[:2, 0]), torch.from_numpy(experts[:2, 0].astype(np.int64)))
    assert 0 < len(narrow.predict(0)) <= 2 * 2
