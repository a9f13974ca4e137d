"""Pre-gating through the planner and the cache, on a hand-built trace with hand-computed outcomes.

Fake routers make pre-gating's guesses known in advance: the "hidden state" at
layer l is a vector whose entry j is the expert the router of layer j picks.
A tiny deterministic event loop (one link, copies in issue order) plays the
engine: per layer it polls landed copies, counts accesses, places misses as
demand copies, cancels stale prefetches that are still in flight, then asks the
predictor and issues the planner's copies, which overlap the layer's compute.
"""

from __future__ import annotations

import torch

from cache import ExpertCache, ExpertKey, build_policy
from prefetch import build_predictor
from prefetch.planner import PrefetchPlanner

LAYERS, EXPERTS, COMPUTE, COPY = 3, 4, 2, 3

# Per step: the true expert of each layer (K=1), and the guesses layer l's hidden makes for layer l+1.
TRUTH = [(0, 1, 2), (0, 1, 3), (0, 2, 1), (1, 3, 2)]
GUESS = [(1, 3), (2, 3), (2, 0), (3, 3)]


def fake_routers():
    return [lambda h, j=j: h[:, j:j + 1].long() for j in range(LAYERS)]


def hidden_for(step: int, layer: int) -> torch.Tensor:
    h = torch.full((1, LAYERS), -1.0)
    if layer + 1 < LAYERS:
        h[0, layer + 1] = GUESS[step][layer]
    return h


def run_loop(predictor, cache: ExpertCache, planner: PrefetchPlanner):
    now, link_free, stall, demand = 0, 0, 0, 0
    inflight: dict[ExpertKey, int] = {}  # key -> time its copy lands

    def poll(t: int) -> None:
        for key, done in list(inflight.items()):
            if done <= t:
                planner.on_complete(key)
                del inflight[key]

    def copy(start: int) -> int:
        nonlocal link_free
        link_free = max(start, link_free) + COPY
        return link_free

    for step, truth in enumerate(TRUTH):
        predictor.reset()
        for layer in range(LAYERS):
            poll(now)
            key = ExpertKey(layer, truth[layer])
            planner.on_access(key)
            ready = now
            for wave in cache.access(layer, [key.expert], step, pinned=set(inflight)):
                for k, _slot, evicted in wave.misses:
                    if evicted is not None:
                        planner.on_evict(evicted)
                    demand += 1
                    ready = max(ready, copy(now))
                for k, _slot in wave.hits:
                    if k in inflight:
                        ready = max(ready, inflight.pop(k))
            stall += ready - now
            for k in planner.stale(layer):
                if inflight[k] > ready:  # still copying: cancel and free the slot
                    del inflight[k]
                    cache.evict(k)
                    planner.on_cancel(k)
            predictor.observe(layer, hidden_for(step, layer), torch.tensor([[truth[layer]]]))
            for k, _slot, _evicted in planner.plan(predictor.predict(layer), cache, {key}):
                inflight[k] = copy(ready)
            now = ready + COMPUTE
    poll(now)
    return {"now": now, "stall": stall, "demand": demand}


def test_pregate_guesses_are_the_next_routers_choice():
    p = build_predictor("pregate", num_layers=LAYERS, num_experts=EXPERTS, top_k=1, lookahead=2,
                        routers=fake_routers(), path=None, trace=None)
    p.reset()
    h = torch.tensor([[0.0, 3.0, 1.0]])
    p.observe(0, h, torch.tensor([[0]]))
    assert p.predict(0) == [(ExpertKey(1, 3), 1.0), (ExpertKey(2, 1), 0.5)]  # score: rank weight / distance
    p.observe(2, h, torch.tensor([[1]]))
    assert p.predict(2) == []


def test_pregate_scores_are_rank_weighted_counts_over_tokens():
    routers = [lambda h: h[:, :2].long()] * 2
    p = build_predictor("pregate", num_layers=2, num_experts=4, top_k=2, lookahead=1, routers=routers)
    p.observe(0, torch.tensor([[1.0, 2.0], [1.0, 3.0]]), torch.tensor([[0, 1], [0, 1]]))
    got = dict(p.predict(0))
    # Expert 1 is rank 0 for both tokens: (1 + 1) / 2; experts 2 and 3 are rank 1 (weight 0.75) for one token.
    assert got == {ExpertKey(1, 1): 1.0, ExpertKey(1, 2): 0.375, ExpertKey(1, 3): 0.375}


def test_pregate_outcomes_match_hand_count():
    predictor = build_predictor("pregate", num_layers=LAYERS, num_experts=EXPERTS, top_k=1, lookahead=1,
                                routers=fake_routers())
    cache = ExpertCache(build_policy("lru"), LAYERS, [2] * LAYERS)
    planner = PrefetchPlanner(expert_bytes=1, budget_bytes=1)
    clock = run_loop(predictor, cache, planner)
    # Worked by hand (times in units; compute 2, copy 3 per expert, one copy in flight):
    #  issued: (1,1) s0, (2,3) s0, (1,2) s1, (1,2) s2, (2,0) s2, (1,3) s3, (2,3) s3
    #  late:   (1,1) s0, (1,2) s2, (1,3) s3       used while still copying
    #  useful: (2,3) from s0, used in s1           landed at t=9, used at t=18
    #  wasted: (1,2) s1 cancelled at t=16 (lands at 17); (2,0) landed, evicted by s3's demand for (2,2)
    #  (2,3) from s3 has landed unused: not counted yet.
    assert planner.outcomes.as_dict() == {"issued": 7, "useful": 1, "wasted": 2, "late": 3, "cancelled": 1}
    assert clock == {"now": 45, "stall": 21, "demand": 5}
    assert planner.landed == {ExpertKey(2, 3)} and planner.in_flight == set()


def test_no_prefetch_without_a_predictor_costs_more():
    predictor = build_predictor("none", num_layers=LAYERS, num_experts=EXPERTS, top_k=1)
    cache = ExpertCache(build_policy("lru"), LAYERS, [2] * LAYERS)
    planner = PrefetchPlanner(expert_bytes=1, budget_bytes=1)
    clock = run_loop(predictor, cache, planner)
    assert planner.outcomes.issued == 0
    # Demand misses: (0,0) (1,1) (2,2) | (2,3) | (1,2) (2,1) | (0,1) (1,3) (2,2): 9 copies, 27 units of stall.
    assert clock == {"now": 3 * 4 * COMPUTE + 9 * COPY, "stall": 27, "demand": 9}


def test_planner_leaves_a_scope_slot_free_of_copies_in_flight():
    cache = ExpertCache(build_policy("lru"), 2, [2, 1])
    planner = PrefetchPlanner(expert_bytes=1, budget_bytes=10)
    needed = {ExpertKey(0, 0)}
    cache.access(0, [0], 0)
    issued = planner.plan([(ExpertKey(1, 1), 1.0), (ExpertKey(0, 2), 0.9), (ExpertKey(0, 3), 0.8)], cache, needed)
    # Layer 1 has one slot: never prefetched into. Layer 0 has two: one copy in flight at most.
    assert [k for k, _s, _e in issued] == [ExpertKey(0, 2)]


def _one_copy_displacing_expert_0(use_copy_first: bool) -> float:
    """Layer 1 holds experts 0 and 1 (0 the least recent); a prefetch of expert 2 evicts 0; then 0 is
    needed again, before or after the copy is used. Returns the planner's damage estimate."""
    cache = ExpertCache(build_policy("lru"), 2, [2, 2])
    planner = PrefetchPlanner(expert_bytes=1, budget_bytes=10, gate=False)
    cache.access(1, [0], 0)
    cache.access(1, [1], 1)
    issued = planner.plan([(ExpertKey(1, 2), 1.0)], cache, set())
    assert [(k, e) for k, _s, e in issued] == [(ExpertKey(1, 2), ExpertKey(1, 0))]
    planner.on_complete(ExpertKey(1, 2))
    if use_copy_first:
        planner.on_access(ExpertKey(1, 2))  # used: the copy holds what a demand miss would have brought
    planner.on_access(ExpertKey(1, 0))  # the displaced expert, needed again
    if not use_copy_first:
        planner.on_evict(ExpertKey(1, 2))  # the copy leaves unused: wasted
    return planner.damage


def test_a_miss_caused_by_an_unused_copy_is_charged_to_it():
    # Damage is a running average that starts at 0 and takes its first sample at weight 1/2.
    assert _one_copy_displacing_expert_0(use_copy_first=False) == 0.5
    assert _one_copy_displacing_expert_0(use_copy_first=True) == 0.0
