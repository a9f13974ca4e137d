"""Live, on the CPU with the emulated link: prefetching never makes the stall worse than demand paging.

The tiny model decodes with 3 of 8 experts per layer in slots; one page takes 10 ms to
cross the emulated link, far above a layer's compute, so the run is link-bound and a
wasted prefetch costs real stall. Stall is the engine's own counter (time the compute
waited on copies), not wall time, so the other jobs of a busy machine move it little;
what remains (the copy thread's wake-ups) is covered by the tolerance: a prefetching
run may stall up to 30 % more than demand paging, plus two copies' time. The bound is
meaningful: a confidently wrong predictor with the planner's gate off saturates the
link and stalls about twice as long, which the same bound rejects; with the gate on the
planner stops copying and the run stays within it.
"""

from __future__ import annotations

import numpy as np
import pytest

from cache.base import ExpertKey
from engine import Engine
from engine.generation import SamplingParams

SLOTS = 9  # 3 of 8 experts per layer (3 MoE layers, top-2)
COPY_SECONDS = 10e-3
TOLERANCE, SLACK = 1.3, 2 * COPY_SECONDS
PROMPTS = [[5, 9, 17, 33], [7, 40, 41, 42, 90, 3]]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


class ConfidentlyWrong:
    """Half of the next layers' experts at random, each with score 1.0."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, lookahead: int = 1, **_) -> None:
        self.num_layers, self.num_experts, self.lookahead = num_layers, num_experts, lookahead
        self.rng = np.random.default_rng(0)

    def observe(self, layer, hidden, top_k_index) -> None:
        return None

    def predict(self, layer: int) -> list[tuple[ExpertKey, float]]:
        out = []
        for target in range(layer + 1, min(layer + 1 + self.lookahead, self.num_layers)):
            experts = self.rng.choice(self.num_experts, self.num_experts // 2, replace=False)
            out += [(ExpertKey(target, int(e)), 1.0) for e in experts]
        return out

    def reset(self) -> None:
        return None


def _stall(model, **kwargs) -> dict:
    path, page_bytes = model
    with Engine.from_pretrained(path, device="cpu", progress=False, expert_slots=SLOTS, cache_policy="lru",
                                emulate_link_gbps=page_bytes / COPY_SECONDS / 1e9, **kwargs) as eng:
        for prompt in PROMPTS:
            for _ in eng.generate([prompt], GREEDY):
                pass
        return eng.stats()


@pytest.fixture(scope="module")
def demand_paging(tiny_model_dir):
    path = tiny_model_dir("olmoe")
    with Engine.from_pretrained(path, device="cpu", progress=False, expert_slots=SLOTS) as probe:
        model = (path, probe.store.page_bytes)
    return model, _stall(model, prefetch="none")


def _bound(none: dict) -> float:
    return TOLERANCE * none["stall_seconds"] + SLACK


@pytest.mark.parametrize("predictor", ["pregate", "eam", "prev"])
def test_prefetch_never_stalls_longer_than_demand_paging(demand_paging, predictor):
    model, none = demand_paging
    assert none["stall_seconds"] > 20 * COPY_SECONDS, "demand paging hardly stalled: nothing to compare"
    got = _stall(model, prefetch=predictor)
    assert got["stall_seconds"] <= _bound(none), (got["stall_seconds"], none["stall_seconds"], got["prefetch"])


@pytest.mark.parametrize("gate", [False, True], ids=["gate_off", "gate_on"])
def test_the_bound_rejects_a_saturated_link(demand_paging, monkeypatch, gate):
    model, none = demand_paging
    monkeypatch.setattr("engine.build.build_predictor", lambda name, **kwargs: ConfidentlyWrong(**kwargs))
    got = _stall(model, prefetch="prev", prefetch_gate=gate, prefetch_lookahead=2, prefetch_budget_mb=1.0)
    if gate:
        assert got["stall_seconds"] <= _bound(none), (got["stall_seconds"], none["stall_seconds"], got["prefetch"])
    else:
        assert got["prefetch"]["wasted"] > got["prefetch"]["useful"]
        assert got["stall_seconds"] > _bound(none), (got["stall_seconds"], none["stall_seconds"])
