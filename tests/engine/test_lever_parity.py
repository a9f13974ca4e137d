"""Live engine versus simulator with hybrid execution and cache-aware routing: the same counts.

The engine runs on the CPU with an emulated link and records a trace (with router scores when
cache-aware routing is on: the router's choices before substitution); the simulator replays
that trace under the same configuration. The engine's cost model is the simulator's
(``traces.simulate.hybrid_model``) instead of one measured on this machine, so both sides
decide every miss with the same numbers: a copy takes 100 us, a host-computed expert 50 us
plus 20 us per token, so a one- or two-token miss runs on the host and a larger one is fetched.
"""

from __future__ import annotations

import pytest

from engine import Engine
from engine.generation import SamplingParams
from traces.format import load_trace
from traces.simulate import SimConfig, hybrid_model, simulate

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 9, 17, 33, 34, 35], [7, 7, 40, 41, 42, 90, 3], [11]]
SLOTS = 12  # 4 of 8 experts per layer (3 MoE layers, top-2)
COPY_US, HOST_READ_US, HOST_TOKEN_US = 100.0, 50.0, 20.0


def _sim_config(page_bytes: int, cpu_compute: str, delta: float | None) -> SimConfig:
    return SimConfig(policy="lru", capacities=(SLOTS // 3,) * 3, expert_bytes=page_bytes,
                     link_gbps=page_bytes / (COPY_US * 1e3), cpu_compute=cpu_compute,
                     host_read_gbps=page_bytes / (HOST_READ_US * 1e3), host_token_us=HOST_TOKEN_US,
                     cache_aware_routing=delta)


@pytest.mark.parametrize(("cpu_compute", "delta"), [("auto", None), ("always", None), ("never", 0.5),
                                                    ("auto", 0.5), ("auto", 0.0)])
def test_host_computed_and_substitutions_equal_the_live_engine(tiny_model_dir, tmp_path, monkeypatch,
                                                               cpu_compute, delta):
    path = tiny_model_dir("olmoe")
    trace_path = tmp_path / "trace.safetensors"
    with Engine.from_pretrained(path, device="cpu", progress=False, expert_slots=SLOTS) as probe:
        page_bytes = probe.store.page_bytes
    cfg = _sim_config(page_bytes, cpu_compute, delta)
    monkeypatch.setattr("engine.build.calibrate", lambda *args, **kwargs: hybrid_model(cfg))
    with Engine.from_pretrained(path, device="cpu", progress=False, expert_slots=SLOTS, cache_policy="lru",
                                emulate_link_gbps=cfg.link_gbps, cpu_compute=cpu_compute,
                                cache_aware_routing=delta, record_trace=str(trace_path)) as eng:
        for _ in eng.generate(PROMPTS, GREEDY):
            pass
        live = eng.stats()
    trace = load_trace(trace_path)
    assert (trace.scores is not None) == (delta is not None)
    sim = simulate(trace, cfg).as_dict()
    assert (sim["hits"], sim["accesses"]) == (live["hits"], live["queries"])
    assert sim["host_computed"] == live["cpu_computed"]
    assert sim["routing_substitutions"] == live["routing_substitutions"]
    assert sim["bytes_moved"] == live["demand_bytes"]
    if cpu_compute == "auto":
        assert 0 < live["cpu_computed"] < live["misses"], "the rule chose one side only: nothing was compared"
    if cpu_compute == "always":
        assert live["cpu_computed"] == live["misses"] and live["demand_bytes"] == 0
    if delta:
        assert live["routing_substitutions"] > 0, "nothing was substituted: the comparison tested nothing"
