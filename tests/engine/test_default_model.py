"""The embedded default model: it loads, it has learned English, it chats, and train-tiny runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.default_model import default_model_path

HELDOUT = Path(__file__).resolve().parents[1] / "data" / "heldout.txt"

# Measured when the shipped model was built (see MODEL_CARD.md): on 12 windows of 256 tokens spread
# over tests/data/heldout.txt the model scores MODEL_PPL_MEASURED. Baselines: a unigram model of the
# training tokens scores UNIGRAM_PPL_HELDOUT on the whole held-out split, and a unigram model fitted
# on the sample itself (an optimistic, oracle unigram; computed in the test) scores about
# UNIGRAM_PPL_SAMPLE. PPL_BOUND leaves slack for float differences and stays far below both.
MODEL_PPL_MEASURED = 110.5
UNIGRAM_PPL_HELDOUT = 1027.5
UNIGRAM_PPL_SAMPLE = 692.3
PPL_BOUND = 130.0


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tok


def test_shipped_files_and_size():
    root = Path(default_model_path())
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "MODEL_CARD.md"):
        assert (root / name).is_file(), name
    total = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
    assert total <= 30 * 2**20, total
    cfg = json.loads((root / "config.json").read_text())
    assert cfg["model_type"] == "olmoe"
    assert cfg["num_experts"] >= 16 and 2 <= cfg["num_experts_per_tok"] <= 4
    assert cfg["tie_word_embeddings"] is True


def test_loads_as_moe(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert type(model).__name__ == "OlmoeForCausalLM"
    assert len(tok) == model.config.vocab_size
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape[0] == model.config.num_experts


def test_heldout_perplexity_far_below_unigram(model_and_tokenizer):
    import numpy as np

    from engine.default_model.train import encode_documents, evaluate

    model, tok = model_and_tokenizer
    text = HELDOUT.read_text(encoding="utf-8")
    ids = encode_documents(tok, [t for t in text.split("<|endoftext|>") if t.strip()])
    arr = np.asarray(ids, dtype=np.int64)
    counts = np.bincount(arr)
    oracle_unigram = float(np.exp(-np.log(counts[arr] / len(arr)).mean()))
    assert abs(oracle_unigram - UNIGRAM_PPL_SAMPLE) < 1.0, oracle_unigram

    stats = evaluate(model, ids, context=256, max_windows=12, batch_size=4, spread=True)
    ppl = stats["heldout_ppl"]
    assert math.isfinite(ppl)
    assert ppl < PPL_BOUND, (ppl, PPL_BOUND)
    assert PPL_BOUND < oracle_unigram / 5 and PPL_BOUND < UNIGRAM_PPL_HELDOUT / 7
    # experts are all used, not collapsed onto a few: every layer's load entropy stays high
    assert min(stats["routing_entropy_norm"]) > 0.7, stats["routing_entropy_norm"]
    # routing is not random either: consecutive tokens share experts well above K/E
    assert min(stats["consecutive_overlap"]) > 1.5 * stats["random_overlap"], stats


def test_chat_template_renders(model_and_tokenizer):
    _, tok = model_and_tokenizer
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a list?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                    "<|im_start|>user\nWhat is a list?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == text


def test_greedy_generation_is_text(model_and_tokenizer):
    model, tok = model_and_tokenizer
    enc = tok("The list type in Python", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    new = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert new.strip(), new
    assert sum(c.isalpha() for c in new) >= 5, new


def test_train_tiny_end_to_end(tmp_path, capsys):
    from server.cli import main

    data = tmp_path / "sample.txt"
    data.write_text(HELDOUT.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    out = tmp_path / "m"
    rc = main(["train-tiny", "--data", str(data), "--out", str(out), "--steps", "5", "--seed", "1",
               "--layers", "2", "--hidden", "32", "--heads", "2", "--experts", "4", "--top-k", "2",
               "--expert-intermediate", "16", "--vocab-size", "300", "--context", "32",
               "--batch-size", "2", "--eval-windows", "2", "--model-card"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "step 5/5 loss" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 5 and math.isfinite(metrics["heldout_ppl"])
    assert (out / "MODEL_CARD.md").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_experts == 4 and model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(str(out))
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
