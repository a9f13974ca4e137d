"""The learned predictor: the path part, its training (seeded, early-stopped), live = array, files, wasted share."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from prefetch import build_predictor
from prefetch.learned import CANDIDATES, DIRECT_ONLY, LearnedModel, history_rows
from prefetch.training import evaluate, holdout_split, train_learned
from tests.prefetch.synthetic import path_routing, synthetic_routing


def _split(experts, request, phase, holdout=0.2):
    held = holdout_split(request, holdout)
    return (experts[~held], request[~held], phase[~held]), (experts[held], request[held], phase[held])


def test_same_seed_same_weights_other_seed_other_weights():
    experts, request, phase = synthetic_routing(requests=12, tokens=12)
    fit = lambda seed: train_learned(experts, request, 16, 2, width=16, epochs=2, seed=seed, phase=phase)
    a, b, c = fit(3), fit(3), fit(4)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.head, c.head)


def test_path_part_learns_what_no_single_pair_of_layers_shows():
    # Layer l+1 = f(layer l, layer l-1) by XOR: invisible to the direct part's per-expert sums. Layer 1 is a
    # coin flip and 5 % noise per layer: about 0.86 is the best any predictor can do; 0.5 is chance.
    (train, test) = _split(*path_routing())
    direct = train_learned(*train[:2], 16, 1, width=0, history=1, epochs=15, phase=train[2], seed=0)
    full = train_learned(*train[:2], 16, 1, width=32, epochs=15, phase=train[2], seed=0)
    rows = test[2] == 1
    f1 = {name: evaluate(m, *test[:2], 1, phase=test[2], rows=rows)[1]["f1"]
          for name, m in (("direct", direct), ("full", full))}
    assert f1["full"] > 0.75 > f1["direct"] + 0.2, f1


def test_early_stopping_stops_and_restores_the_best_epoch():
    # Few training rows and a large learning rate: the validation loss turns up within a few epochs.
    experts, request, phase = synthetic_routing(requests=20, tokens=12, noise=0.5, stick=0.0)
    seen = []
    model = train_learned(experts, request, 16, 1, width=64, epochs=40, patience=2, validation=0.3, lr=0.1,
                          phase=phase, progress=seen.append)
    losses = [s["val_loss"] for s in seen]
    best = int(np.argmin(losses)) + 1
    assert len(seen) < 40 and len(seen) == best + 2  # stopped `patience` epochs after the best one
    fit = model.meta["fit"]
    assert (fit["epochs_run"], fit["best_epoch"], fit["val_loss"]) == (len(seen), best, min(losses))
    # The returned weights are the best epoch's: same validation loss when recomputed.
    again = train_learned(experts, request, 16, 1, width=64, epochs=best, patience=40, validation=0.3, lr=0.1,
                          phase=phase)
    assert all(torch.equal(model.state_dict()[k], again.state_dict()[k]) for k in model.state_dict())


def test_history_rows_skip_prefill_and_cross_no_request():
    request = np.array([0, 0, 1, 0, 0, 1])
    phase = np.array([0, 0, 0, 1, 1, 1])
    assert history_rows(request, phase, 3).tolist() == [
        [-1, -1, -1], [-1, -1, -1], [-1, -1, -1], [1, 0, -1], [3, 1, 0], [2, -1, -1]]


@pytest.fixture(scope="module")
def model():
    experts, request, phase = synthetic_routing(requests=16, tokens=16)
    return train_learned(experts, request, 16, 2, width=24, history=3, epochs=3, phase=phase, seed=0)


def test_live_predict_agrees_with_predict_array(model):
    experts, request, phase = synthetic_routing(requests=4, tokens=16, seed=5)
    e64 = experts.astype(np.int64)
    live = build_predictor("learned", num_layers=6, num_experts=16, top_k=2, lookahead=2, model=model)
    arrays = {d: model.predict_array(e64, request, d, phase=phase) for d in (1, 2)}
    # As the engine runs a request: the prompt in one forward of T rows, then one forward per decode token.
    for r in np.unique(request):
        rows = np.flatnonzero(request == r)
        prompt, decode = rows[phase[rows] == 0], rows[phase[rows] == 1]
        live.begin_request()
        for step in [prompt] + [[i] for i in decode]:
            live.reset()
            for layer in range(6):
                live.observe(layer, None, torch.from_numpy(e64[step, layer]))
                if len(step) > 1:
                    continue
                got = {(k.layer, k.expert): s * (k.layer - layer) for k, s in live.predict(layer)}
                for d in (1, 2):
                    if layer + d > 5:
                        continue
                    guess, prob = arrays[d][0][step[0], layer], arrays[d][1][step[0], layer]
                    # Live lists CANDIDATES x K guesses per target, best first: the first K are predict_array's.
                    listed = [e for (t, e) in got if t == layer + d]
                    assert len(listed) == CANDIDATES * 2 and listed[:2] == guess.tolist()
                    assert [got[(layer + d, int(e))] for e in guess] == pytest.approx(prob.tolist(), rel=1e-4)
                    assert min(prob) >= max(got[(layer + d, e)] for e in listed[2:])


def test_direct_only_files_still_load_and_unknown_features_ask_to_retrain(model, tmp_path):
    direct = LearnedModel(6, 16, 2, 2)
    with torch.no_grad():
        direct.weight.normal_(generator=torch.Generator().manual_seed(0))
        direct.weight[-1] = 0.0
    path = tmp_path / "direct.safetensors"
    direct.save(path)
    tensors = load_file(str(path))
    cfg = {"num_layers": 6, "num_experts": 16, "top_k": 2, "lookahead": 2, "hidden_size": 0, "features": DIRECT_ONLY}
    old = tmp_path / "old.safetensors"  # as files were written before the path part
    save_file(tensors, str(old), metadata={"format": "moepager.predictor", "kind": "learned", "config": json.dumps(cfg)})
    loaded = LearnedModel.load(old)
    assert (loaded.width, loaded.history) == (0, 1) and torch.equal(loaded.weight, direct.weight)
    experts, request, phase = synthetic_routing(requests=3, tokens=8, seed=2)
    got, want = loaded.predict_array(experts, request, 1, phase=phase), direct.predict_array(experts, request, 1,
                                                                                           phase=phase)
    assert np.array_equal(got[0], want[0])
    cfg["features"] = "something:else"
    save_file(tensors, str(old), metadata={"format": "moepager.predictor", "kind": "learned", "config": json.dumps(cfg)})
    with pytest.raises(ValueError, match="retrain it with `moepager predictor train`"):
        LearnedModel.load(old)
    model.save(tmp_path / "new.safetensors")
    again = LearnedModel.load(tmp_path / "new.safetensors")
    assert all(torch.equal(model.state_dict()[k], again.state_dict()[k]) for k in model.state_dict())


def test_wasted_share_by_hand():
    # One request, two rows, L=2, K=2; guesses for layer 1 with probabilities.
    experts = np.array([[[0, 1], [2, 3]], [[0, 1], [2, 1]]])
    request = np.zeros(2, dtype=int)

    def guess(experts, request, distance, **kw):
        pred = np.array([[[2, 0]], [[3, 1]]])
        prob = np.array([[[0.9, 0.6]], [[0.5, 0.2]]])
        return pred, prob

    res = evaluate(guess, experts, request, 1)[1]
    # Copied at p >= 0.5: row 0 {2 (used), 0 (not)}, row 1 {3 (not)}: 1 of 3 used; 2 + 2 experts were needed.
    assert res["wasted"] == pytest.approx(2 / 3)
    assert res["covered"] == pytest.approx(1 / 4)
    assert res["precision"] == pytest.approx(2 / 4)  # every guess: row 0 hits 2, row 1 hits 1
    assert evaluate(guess, experts, request, 1, threshold=0.0)[1]["wasted"] == pytest.approx(1 - 2 / 4)
