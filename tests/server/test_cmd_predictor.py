"""`moepager predictor train` then `eval`: the held-out F1 stored in the file is reproduced."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from prefetch.learned import LearnedModel
from server.cli import main
from tests.prefetch.synthetic import synthetic_routing
from traces.format import Trace, save_trace


def write_trace(path, seed=0, requests=30):
    experts, request, phase = synthetic_routing(requests=requests, tokens=24, seed=seed)
    position = np.concatenate([np.arange((request == r).sum()) for r in np.unique(request)]).astype(np.int32)
    save_trace(path, Trace(experts=experts, weights=np.full(experts.shape, 0.5, np.float16), request=request,
                           position=position, phase=phase, meta={"experts": 16, "top_k": 2, "moe_layers": list(range(6))}))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pred")
    trace = write_trace(tmp / "trace.safetensors")
    out = tmp / "pred.safetensors"
    return trace, out


def test_train_then_eval_reproduces_heldout_f1(trained, capsys):
    trace, out = trained
    assert main(["predictor", "train", str(trace), "--out", str(out), "--lookahead", "2", "--epochs", "3",
                 "--holdout", "0.2", "--seed", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert "epoch 3/3" in captured.err  # progress goes to stderr with --json
    reported = json.loads(captured.out.strip().splitlines()[-1])["results"]
    model = LearnedModel.load(out)
    assert model.meta["heldout"] == reported["learned"]
    assert model.meta["train"]["holdout"] == 0.2
    assert reported["learned"]["1"]["f1"] > reported["prev"]["1"]["f1"]

    assert main(["predictor", "eval", str(out), "--trace", str(trace), "--holdout", "0.2", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    evaluated = json.loads(lines[-1])
    assert evaluated["results"] == reported  # same rows, same code: learned and both baselines agree exactly
    assert evaluated["lookahead"] == 2
    assert {"wasted", "covered"} <= set(reported["learned"]["1"])


def test_train_is_deterministic_by_seed(trained, tmp_path, capsys):
    trace, _out = trained
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        path = tmp_path / f"{name}.safetensors"
        assert main(["predictor", "train", str(trace), "--out", str(path), "--epochs", "2", "--width", "16",
                     "--seed", str(seed)]) == 0
        runs[name] = load_file(str(path))
    capsys.readouterr()
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not torch.equal(runs["a"]["head"], runs["c"]["head"])


def test_eval_text_table_and_errors(trained, capsys, tmp_path):
    trace, out = trained
    if not out.exists():
        pytest.skip("needs the trained predictor from the previous test")
    assert main(["predictor", "eval", str(out), "--trace", str(trace), "--phase", "all"]) == 0
    text = capsys.readouterr().out
    assert "learned P/R/F1" in text and "prev P/R/F1" in text and "freq P/R/F1" in text
    assert main(["predictor", "eval", str(out), "--trace", str(trace), "--lookahead", "3"]) == 2
    assert "trained for 2" in capsys.readouterr().err
    assert main(["predictor", "eval", str(trace), "--trace", str(trace)]) == 2
    assert "not a moepager learned predictor" in capsys.readouterr().err
    assert main(["predictor", "train", str(trace), "--out", str(tmp_path / "x.safetensors"), "--use-hidden"]) == 2
    assert "hidden" in capsys.readouterr().err


def test_traces_with_token_ids_train_a_token_part(tmp_path, capsys):
    """`trace synth` writes ids; train reads them (unless --token-vocab 0) and eval reproduces its F1."""
    trace = tmp_path / "tokens.safetensors"
    assert main(["trace", "synth", "--regime", "tokens", "--requests", "60", "--layers", "4", "--experts", "16",
                 "--top-k", "2", "--vocab", "64", "--prompt-len", "24", "--decode-len", "24", "--out", str(trace)]) == 0
    with_ids, blind = tmp_path / "ids.safetensors", tmp_path / "blind.safetensors"
    f1 = {}
    for out, extra in ((with_ids, []), (blind, ["--token-vocab", "0"])):
        assert main(["predictor", "train", str(trace), "--out", str(out), "--lookahead", "1", "--epochs", "15",
                     "--width", "16", "--json", *extra]) == 0
        f1[out.name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]["learned"]["1"]["f1"]
    kept = LearnedModel.load(with_ids)
    assert 0 < kept.token_vocab <= 64 and LearnedModel.load(blind).token_vocab == 0  # ids seen, of 64
    assert f1["ids.safetensors"] > f1["blind.safetensors"] + 0.03, f1  # measured 0.355 against 0.304
    assert main(["predictor", "eval", str(with_ids), "--trace", str(trace), "--holdout", "0.2", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]["learned"]["1"]["f1"]
    assert evaluated == f1["ids.safetensors"]
    with pytest.raises(SystemExit) as exc:
        main(["predictor", "train", str(trace), "--out", str(blind), "--token-vocab", "-1"])
    assert exc.value.code == 2 and "--token-vocab" in capsys.readouterr().err
