"""The simulator's hybrid execution and cache-aware routing, by hand and on synthetic regimes.

Hand-built timings: one copy takes 100 us (1 MB over 10 GB/s), one device wave 10 us, one
host-computed expert 50 us (its page read at 20 GB/s) plus 20 us per token. A layer whose
every expert ran on the host still pays its 10 us of device compute.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.traces.helpers import make_trace
from traces.simulate import SimConfig, simulate
from traces.synth import regime, synth_trace

HAND = SimConfig(policy="lru", expert_bytes=1_000_000, link_gbps=10.0, layer_compute_us=10.0, host_read_gbps=20.0,
                 host_token_us=20.0)


def _per_token_us(trace, config: SimConfig) -> float:
    return simulate(trace, config).as_dict()["seconds_per_token"] * 1e6


def _modes(trace, config: SimConfig) -> dict[str, float]:
    return {mode: _per_token_us(trace, replace(config, cpu_compute=mode)) for mode in ("never", "auto", "always")}


def test_streaming_experts_by_hand():
    """Eight experts once each, two slots: every miss is cold. auto fetches while a slot is free, then
    computes on the host (70 us < 100 us copy)."""
    trace = make_trace([[e] for e in range(8)], num_experts=8)
    got = _modes(trace, replace(HAND, capacities=(2,)))
    assert got["never"] == pytest.approx(110.0)  # copy 100 + wave 10, per token
    assert got["always"] == pytest.approx(80.0)  # host 50 + 20, and the layer's 10
    assert got["auto"] == pytest.approx((2 * 110 + 6 * 80) / 8)
    assert got["auto"] <= max(got["never"], got["always"])


def test_batched_steps_by_hand():
    """Two steps of eight rows, four tokens per expert: the host would take 130 us per expert, more than
    a copy, so auto fetches like never does."""
    experts = [[0], [1]] * 4 + [[2], [3]] * 4
    trace = make_trace(experts, num_experts=4, step=[0] * 8 + [1] * 8)
    got = _modes(trace, replace(HAND, capacities=(2,)))
    assert got["never"] == pytest.approx((210 + 210) / 16)  # two copies queued back to back, one wave
    assert got["always"] == pytest.approx((270 + 270) / 16)  # two experts of 130 us, and the layer's 10
    assert got["auto"] == pytest.approx(got["never"])
    assert got["auto"] <= max(got["never"], got["always"])


def test_auto_with_a_reused_expert_by_hand():
    """One slot; expert 1 is used five times in a row. never: 110 + 110 + 4 * 10; always: 6 * 80;
    auto rents, then buys: 110 (free slot) + 80 (host: 80 < 110) + 110 (80 + 80 would pass one
    copy: fetched) + 3 * 10 (hits). A per-miss rule would pay 110 + 5 * 80, worse than both."""
    trace = make_trace([[0]] + [[1]] * 5, num_experts=2)
    got = _modes(trace, replace(HAND, capacities=(1,)))
    assert got["never"] == pytest.approx(260 / 6) and got["always"] == pytest.approx(480 / 6)
    assert got["auto"] == pytest.approx(330 / 6)


@pytest.mark.parametrize("name", ["skewed", "sticky", "mixed"])
def test_always_moves_no_miss_over_the_link(name):
    trace = synth_trace(regime(name, requests=3, decode_len=24))
    timed = replace(HAND, capacities=(16,) * trace.num_layers)
    for config in (timed, replace(timed, link_gbps=None, layer_compute_us=0.0)):
        never = simulate(trace, config).as_dict()
        always = simulate(trace, replace(config, cpu_compute="always")).as_dict()
        assert never["bytes_moved"] > 0 and never["host_computed"] == 0
        assert always["bytes_moved"] == 0 and always["experts_moved"] == 0
        assert always["host_computed"] == always["accesses"] - always["hits"] > 0
        assert always["host_share"] == 1.0


@pytest.mark.parametrize("name", ["sticky", "mixed"])
def test_auto_is_never_worse_than_both_on_regimes(name):
    trace = synth_trace(regime(name, requests=3, decode_len=24))
    for compute_us in (10.0, 1000.0):  # link-bound, compute-rich
        got = _modes(trace, replace(HAND, capacities=(16,) * trace.num_layers, layer_compute_us=compute_us))
        assert got["auto"] <= max(got["never"], got["always"]), (compute_us, got)


def test_hybrid_needs_host_and_link_times():
    trace = make_trace([[0], [1]], num_experts=2)
    with pytest.raises(ValueError, match="host's expert time"):
        simulate(trace, replace(HAND, capacities=(1,), cpu_compute="auto", host_read_gbps=None, host_token_us=0.0))
    with pytest.raises(ValueError, match="--link-gbps"):
        simulate(trace, replace(HAND, capacities=(1,), cpu_compute="auto", link_gbps=None))


@pytest.fixture(scope="module")
def scored():
    return [synth_trace(regime(name, requests=3, decode_len=24), scores=True) for name in ("skewed", "mixed")]


def _configs(trace) -> list[SimConfig]:
    caps = (12,) * trace.num_layers
    return [SimConfig(policy="lru", capacities=caps),
            replace(HAND, capacities=caps, policy="lfu", prefetch="prev"),
            replace(HAND, capacities=caps, cpu_compute="auto")]


def test_zero_delta_is_bit_identical(scored):
    for trace in scored:
        for config in _configs(trace):
            off = simulate(trace, config).as_dict()
            zero = simulate(trace, replace(config, cache_aware_routing=0.0)).as_dict()
            assert zero == off
            assert zero["routing_substitutions"] == 0


def test_positive_delta_substitutes_and_keeps_hit_rate(scored):
    for trace in scored:
        for config in _configs(trace):
            off = simulate(trace, config)
            on = simulate(trace, replace(config, cache_aware_routing=0.3))
            assert on.routing_substitutions > 0
            assert on.hit_rate >= off.hit_rate


def test_delta_needs_router_scores():
    trace = synth_trace(regime("mixed", requests=2, decode_len=8))
    with pytest.raises(ValueError, match="needs router scores"):
        simulate(trace, SimConfig(capacities=(8,) * trace.num_layers, cache_aware_routing=0.1))
    zero = simulate(trace, SimConfig(capacities=(8,) * trace.num_layers, cache_aware_routing=0.0)).as_dict()
    assert zero == simulate(trace, SimConfig(capacities=(8,) * trace.num_layers)).as_dict()
