"""Live engine versus simulator with prefetching on: the same per-layer step, the same counts.

The engine records a trace, then runs again for each (policy, predictor, link); the simulator
replays the trace under the same configuration. Without a link both sides use instant copies;
with one, both run on ``traces.link.TimedLink`` (copies take two layer computes on a virtual
clock), the live engine moving the real bytes at issue time, so timing is deterministic.
"""

from __future__ import annotations

import pytest
import torch

from engine import Engine
from engine.generation import SamplingParams
from traces.format import load_trace
from traces.simulate import SimConfig, simulate, timed_link

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 9, 17, 33], [7, 7, 40, 41, 42, 90, 3], [11]]
SLOTS = 12  # 4 of 8 experts per layer (3 MoE layers, top-2): room to prefetch, pressure to evict
# Slots per policy: at 3 per layer stale prefetches get cancelled, at 4 some land late.
POLICIES = {"lru": 9, "lfu": 12, "eam": 12}
PREDICTORS = ("prev", "freq", "eam", "learned")  # pregate: live only (routers); oracle: simulator only
COMPUTE_US = 1000.0  # one layer compute on the virtual clock
COPY_COMPUTES = 2  # a copy takes this many layer computes


def _generate(eng: Engine) -> None:
    for _ in eng.generate(PROMPTS, GREEDY):
        pass
    for _ in eng.generate([[3, 4, 5, 6]], GREEDY):
        pass


@pytest.fixture(scope="module")
def recorded(tiny_model_dir, tmp_path_factory):
    """The model, its routing trace and a learned predictor trained on that trace."""
    from prefetch.training import train_learned

    path = tiny_model_dir("olmoe")
    out = tmp_path_factory.mktemp("step_parity")
    trace_path = out / "trace.safetensors"
    with Engine.from_pretrained(path, device="cpu", progress=False, expert_slots=SLOTS,
                                record_trace=str(trace_path)) as eng:
        _generate(eng)
        page_bytes = eng.store.page_bytes
    trace = load_trace(trace_path)
    model = train_learned(trace.experts, trace.request, trace.num_experts, 1, epochs=2, phase=trace.phase)
    model.save(out / "learned.safetensors")
    return path, trace, page_bytes, str(out / "learned.safetensors")


def _sim_config(policy: str, predictor: str, page_bytes: int, learned: str, timed: bool,
                slots: int = SLOTS) -> SimConfig:
    return SimConfig(policy=policy, capacities=(slots // 3,) * 3, prefetch=predictor, prefetch_lookahead=1,
                     predictor_path=learned if predictor == "learned" else None, expert_bytes=page_bytes,
                     link_gbps=page_bytes / (COPY_COMPUTES * COMPUTE_US * 1e3) if timed else None,
                     layer_compute_us=COMPUTE_US if timed else 0.0)


@pytest.mark.parametrize("timed", [False, True], ids=["instant", "timed_link"])
@pytest.mark.parametrize("predictor", PREDICTORS)
def test_simulator_counts_equal_the_live_engine(recorded, predictor, timed):
    path, trace, page_bytes, learned = recorded
    issued_somewhere = 0
    for policy, slots in POLICIES.items():
        cfg = _sim_config(policy, predictor, page_bytes, learned, timed, slots)
        link_factory = None
        if timed:
            def link_factory(store, slots, cfg=cfg):
                def mover(key, slot):
                    slots[slot].copy_(store.page(key.layer, key.expert))

                return timed_link(cfg, mover)

        with Engine.from_pretrained(path, device="cpu", progress=False, expert_slots=slots, cache_policy=policy,
                                    prefetch=predictor, prefetch_lookahead=1, predictor_path=cfg.predictor_path,
                                    link_factory=link_factory) as eng:
            _generate(eng)
            live = eng.stats()
            assert tuple(eng.cache.capacities) == cfg.capacities
        sim = simulate(trace, cfg).as_dict()
        assert (sim["hits"], sim["accesses"]) == (live["hits"], live["queries"]), policy
        assert sim["prefetch"] == live["prefetch"], policy
        if timed:
            stall = sim["stall_seconds_per_token"] * sim["tokens"]
            assert live["stall_seconds"] == pytest.approx(stall, rel=1e-9, abs=1e-12), policy
        issued_somewhere += live["prefetch"]["issued"]
    assert issued_somewhere > 0, "no prefetch was issued: the comparison tested nothing"


def test_the_compared_cases_exercise_late_and_cancelled_prefetches(recorded):
    """The step's late and cancelled paths are reachable on this trace: with the planner's value gate off
    (every prediction copied), the timed link makes prefetches late or cancelled. With the gate on (the
    parity cases above) the planner declines most copies the link could not land in time."""
    from dataclasses import replace

    _path, trace, page_bytes, learned = recorded

    def ungated(*args) -> SimConfig:
        return replace(_sim_config(*args), prefetch_gate=False)

    timed = simulate(trace, ungated("lfu", "freq", page_bytes, learned, True, POLICIES["lfu"])).as_dict()
    assert timed["prefetch"]["late"] > 0 and timed["stall_seconds_per_token"] > 0
    tight = simulate(trace, ungated("lru", "freq", page_bytes, learned, True, POLICIES["lru"])).as_dict()
    assert tight["prefetch"]["cancelled"] > 0
    instant = simulate(trace, ungated("lfu", "freq", page_bytes, learned, False, POLICIES["lfu"])).as_dict()
    assert instant["prefetch"]["late"] == 0 and instant["prefetch"]["useful"] > 0


def test_zero_copy_cpu_slots_hold_no_memory(tiny_model_dir):
    path = tiny_model_dir("olmoe")
    with Engine.from_pretrained(path, device="cpu", progress=False, expert_slots=SLOTS) as eng:
        assert eng.zero_copy and eng.runtime.slots.numel() == 0
        eng.logits(torch.tensor([[4, 8, 15, 16, 23, 42]]))
        stats = eng.stats()
        assert stats["misses"] > 0 and stats["demand_bytes"] == stats["misses"] * eng.store.page_bytes
    with Engine.from_pretrained(path, device="cpu", progress=False, expert_slots=SLOTS,
                                emulate_link_gbps=50.0) as eng:
        assert not eng.zero_copy
        assert eng.runtime.slots.numel() * eng.runtime.slots.element_size() == SLOTS * eng.store.page_bytes
