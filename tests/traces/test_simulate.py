"""The simulator: hand-computed hits, step grouping, link model, and Belady's optimality."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.base import policy_names
from tests.traces.helpers import make_trace
from traces.simulate import SimConfig, build_schedule, capacities_for, future_accesses, simulate


def test_plain_replay_counts_hits():
    trace = make_trace([[0], [0], [1], [0]], 2)  # 1 layer, 1 slot: miss, hit, miss, miss
    res = simulate(trace, SimConfig(policy="lru", capacities=(1,), expert_bytes=10))
    assert (res.hits, res.accesses, res.experts_moved, res.bytes_moved) == (1, 4, 3, 30)
    d = res.as_dict()
    assert d["hit_rate"] == 0.25 and "stall_seconds_per_token" not in d


def test_rows_of_one_step_are_replayed_together():
    trace = make_trace([[0], [0], [1]], 2, step=[0, 0, 1])
    grouped = simulate(trace, SimConfig(capacities=(1,)))
    per_token = simulate(trace, SimConfig(capacities=(1,), per_token=True))
    assert (grouped.hits, grouped.accesses, grouped.steps) == (0, 2, 2)
    assert (per_token.hits, per_token.accesses, per_token.steps) == (1, 3, 3)


def test_link_model_demand_only_by_hand():
    # 2 layers, 1 slot each, 1 ms per copy (1 MB at 1 GB/s), 0.1 ms compute per layer.
    # token 0: L0 miss (copy 0-1, stall 1), compute to 1.1; L1 miss (copy 1.1-2.1, stall 1), to 2.2
    # token 1: L0 miss (copy 2.2-3.2, stall 1), to 3.3; L1 hit, to 3.4.  Stall 3 ms / 2 tokens.
    trace = make_trace([[0, 0], [1, 0]], 2)
    cfg = SimConfig(capacities=(1, 1), expert_bytes=10**6, link_gbps=1.0, layer_compute_us=100.0)
    d = simulate(trace, cfg).as_dict()
    assert d["hits"] == 1 and d["bytes_moved"] == 3 * 10**6
    assert d["stall_seconds_per_token"] == pytest.approx(1.5e-3)
    assert d["tokens_per_second"] == pytest.approx(2 / 3.4e-3)


def test_link_model_with_a_late_oracle_prefetch_by_hand():
    # One token, L0 -> expert 0, L1 -> expert 1. The oracle prefetch of L1/1 is issued at t=0 but
    # queues behind L0's demand copy (0-1 ms), so it runs 1-2 ms; L1 starts at 1.1 ms: late, waits
    # 0.9 ms. Stall 1.9 ms, total 2.1 ms.
    trace = make_trace([[0, 1]], 4)
    cfg = SimConfig(capacities=(2, 2), expert_bytes=10**6, link_gbps=1.0, layer_compute_us=100.0,
                    prefetch="oracle", prefetch_lookahead=1)
    d = simulate(trace, cfg).as_dict()
    assert d["stall_seconds_per_token"] == pytest.approx(1.9e-3)
    assert d["tokens_per_second"] == pytest.approx(1 / 2.1e-3)
    assert d["prefetch"]["issued"] == 1 and d["prefetch"]["late"] == 1
    assert d["bytes_moved"] == 2 * 10**6


def test_instant_prefetch_without_a_link_counts_as_useful():
    trace = make_trace([[0, 1], [2, 3]], 4)
    d = simulate(trace, SimConfig(capacities=(2, 2), prefetch="oracle")).as_dict()
    assert d["prefetch"]["issued"] == 2 and d["prefetch"]["useful"] == 2
    assert d["hits"] == 2  # both L1 accesses were prefetched


def test_capacities_from_flags(tmp_path):
    from traces import save_trace

    trace = make_trace([[[0, 1], [0, 1]], [[2, 3], [0, 1]]], 8)
    assert capacities_for(trace, slots_per_layer=3) == ([3, 3], "layer")
    assert capacities_for(trace, capacity_fraction=0.5) == ([4, 4], "layer")
    assert capacities_for(trace, slots_per_layer=3, scope="global") == ([6], "global")
    assert capacities_for(trace, slots_per_layer=3, split="global") == ([6], "global")
    save_trace(tmp_path / "p.safetensors", trace)
    caps, scope = capacities_for(trace, slots_per_layer=3, split=f"profile:{tmp_path / 'p.safetensors'}")
    assert scope == "layer" and sum(caps) == 6 and caps[0] > caps[1]  # layer 0 touches 4 experts, layer 1 two


def test_future_matches_cache_steps():
    sched = build_schedule(make_trace([[[1, 0], [2, 3]]], 4))
    assert future_accesses(sched) == [(0, (0, 0)), (0, (0, 1)), (1, (1, 2)), (1, (1, 3))]


@st.composite
def _cases(draw):
    layers = draw(st.integers(1, 2))
    experts = draw(st.integers(2, 6))
    k = draw(st.integers(1, min(2, experts)))
    n = draw(st.integers(1, 25))
    rows = [[draw(st.lists(st.integers(0, experts - 1), min_size=k, max_size=k, unique=True))
             for _ in range(layers)] for _ in range(n)]
    cap = draw(st.integers(k, experts))
    scope = draw(st.sampled_from(["layer", "global"]))
    return rows, experts, layers, cap, scope


@settings(max_examples=40, deadline=None)
@given(_cases())
def test_belady_is_never_beaten(case):
    rows, experts, layers, cap, scope = case
    trace = make_trace(rows, experts)
    caps = (cap,) * layers if scope == "layer" else (cap,)
    sched = build_schedule(trace)
    best = simulate(trace, SimConfig(policy="belady", capacities=caps, scope=scope), sched).hits
    for name in policy_names(online_only=True):
        assert simulate(trace, SimConfig(policy=name, capacities=caps, scope=scope), sched).hits <= best, name
