"""A real evaluation harness as a client: lm-eval's ``local-completions`` model scores a small
multiple-choice task (a local file) against a live server. Its log-likelihoods must equal the
engine's own logits and it must pick the same answers."""

from __future__ import annotations

import json

import pytest
import torch
from serving_helpers import live_server, make_app

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"question": "abc", "choices": ["def", "xyz", "aaa"], "answer": 0},
    {"question": "the cat", "choices": ["sat", "ran"], "answer": 1},
    {"question": "1 2 3", "choices": ["4", "7", "9"], "answer": 0},
    {"question": "hello", "choices": ["world", "there"], "answer": 0},
]

TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def engine_loglikelihood(engine, context: str, continuation: str) -> float:
    tok = engine.tokenizer
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    logp = torch.log_softmax(engine.logits(torch.tensor([whole]))[0].float(), dim=-1)  # [T, V]
    return sum(float(logp[j - 1, whole[j]]) for j in range(len(ctx), len(whole)))


def test_lm_eval_loglikelihoods_match_the_engine(engine, server_model_dir, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(TASK.format(data=data))

    with live_server(make_app(engine, served_model_name="tiny")) as base:
        results = simple_evaluate(
            model="local-completions",
            model_args={"model": "tiny", "base_url": base + "/v1/completions", "tokenizer": str(server_model_dir),
                        "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1,
                        "tokenized_requests": True},
            tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
            bootstrap_iters=0)

    samples = sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    for sample, doc in zip(samples, DOCS, strict=True):
        harness = [resp[0][0] for resp in sample["resps"]]  # one (loglikelihood, is_greedy) per choice
        mine = [engine_loglikelihood(engine, doc["question"], " " + c) for c in doc["choices"]]
        assert harness == pytest.approx(mine, abs=1e-3)
        assert max(range(len(mine)), key=mine.__getitem__) == max(range(len(harness)), key=harness.__getitem__)
        assert sample["acc"] == float(max(range(len(mine)), key=mine.__getitem__) == doc["answer"])
