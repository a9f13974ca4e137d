"""The learned predictor in the timed simulator: a share of the oracle's gain where compute hides copies,
and never slower than no prefetching where the link is the bottleneck.

A synthetic regime with a path through the layers (each expert of layer l is followed by its fixed
successor at l+1 with probability ``cross_layer``) and some temporal locality; the predictor trains on
the first requests and is scored on the held-out ones, as bench/prefetch_table.py does. Share of the
oracle's gain = (stall_none - stall_learned) / (stall_none - stall_oracle).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.prefetch_table import take_rows
from prefetch.training import holdout_split, train_learned
from traces.simulate import SimConfig, build_schedule, simulate
from traces.synth import regime, synth_trace

EXPERT_BYTES = 1_000_000
LINK_GBPS = 10.0  # 100 us per copy
SLOTS = 8  # of 32 experts per layer


SHARE_BOUND = 0.36


@pytest.fixture(scope="module", params=[3, 4])
def setup(request, tmp_path_factory):
    torch.manual_seed(0)
    trace = synth_trace(regime("crosslayer", seed=request.param, layers=4, experts=32, top_k=4, requests=30,
                               prompt_len=12, decode_len=48))
    held = holdout_split(trace.request, 0.2)
    model = train_learned(trace.experts[~held].astype(np.int64), trace.request[~held].astype(np.int64),
                          trace.num_experts, 1, epochs=10, phase=trace.phase[~held], seed=0)
    path = tmp_path_factory.mktemp("learned") / "learned.safetensors"
    model.save(path)
    test = take_rows(trace, held)
    return test, build_schedule(test, per_token=True), str(path)


def _stall(setup, prefetch: str, compute_us: float) -> float:
    trace, schedule, path = setup
    cfg = SimConfig(policy="lru", capacities=(SLOTS,) * trace.num_layers, prefetch=prefetch,
                    predictor_path=path if prefetch == "learned" else None, expert_bytes=EXPERT_BYTES,
                    link_gbps=LINK_GBPS, layer_compute_us=compute_us, per_token=True)
    return simulate(trace, cfg, schedule).stall_seconds


def test_learned_reaches_most_of_the_oracles_gain_when_compute_hides_copies(setup):
    # 2000 us of compute per layer hides 20 copies: the link is idle most of the time.
    none, learned, oracle = (_stall(setup, p, 2000.0) for p in ("none", "learned", "oracle"))
    share = (none - learned) / (none - oracle)
    # Measured 0.404 and 0.388 (seeds 3, 4); before the learned predictor listed runners-up and the planner
    # unprotected wrong guesses once their step was over: 0.321 and 0.319.
    assert share >= SHARE_BOUND, (none, learned, oracle, share)


@pytest.mark.parametrize("compute_us", [5.0, 50.0, 200.0])
def test_learned_is_never_slower_than_none_where_the_link_is_busy(setup, compute_us):
    # From a copy costing 20 layers of compute to half of one. Allowance: the planner's one-off learning
    # cost, as in test_never_hurts.py (about 2 x 60 copies of 100 us per run).
    none, learned = (_stall(setup, p, compute_us) for p in ("none", "learned"))
    assert learned <= none + 2 * 60 * 1e-4, (compute_us, none, learned)
