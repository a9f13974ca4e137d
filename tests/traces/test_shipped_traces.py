"""Traces recorded from the embedded default model: real routing, with real structure.

Random-weight models route almost uniformly; these traces are what policies and
predictors are judged on (see bench/RESULTS.md for the full tables).
"""

from pathlib import Path

import numpy as np
import pytest

from cache.base import policy_names
from traces.format import load_trace
from traces.simulate import SimConfig, build_schedule, simulate
from traces.stats import consecutive_overlap

DATA = Path(__file__).resolve().parents[1] / "data"
TRACES = ["trace_heldout.safetensors", "trace_chat.safetensors"]


@pytest.fixture(scope="module", params=TRACES)
def trace(request):
    return load_trace(DATA / request.param, hidden=False)


def test_traces_describe_the_default_model(trace):
    assert trace.num_layers == 4 and trace.num_experts == 32 and trace.top_k == 4
    assert len(np.unique(trace.request)) >= 10
    assert set(np.unique(trace.phase).tolist()) == {0, 1}


def test_consecutive_token_overlap_is_well_above_random(trace):
    per_layer = consecutive_overlap(trace)
    assert len(per_layer) == trace.num_layers
    for row in per_layer:
        # uniform: K/E, the overlap of two independent uniform top-k draws
        assert row["observed"] > 2 * row["random_uniform"], row
    # Beyond popularity: on average consecutive tokens share more experts than two independent draws
    # from each layer's own expert frequencies would (the chat trace is the more popularity-driven one).
    margin = np.mean([row["observed"] - row["independent_same_frequency"] for row in per_layer])
    assert margin > 0.02, per_layer


def test_belady_bounds_every_online_policy_and_lru_is_beaten(trace):
    schedule = build_schedule(trace, per_token=True)
    caps = (trace.num_experts // 4,) * trace.num_layers
    rates = {p: simulate(trace, SimConfig(policy=p, capacities=caps), schedule).hit_rate
             for p in policy_names(online_only=True) + ["belady"]}
    assert all(rates["belady"] >= r for r in rates.values())
    best = max(r for p, r in rates.items() if p != "belady")
    assert best > rates["lru"]
    assert best >= 0.85 * rates["belady"]
