"""Each policy against its nearest neighbour on a hand-computed sequence (exact hits)."""

from __future__ import annotations

import pytest

from cache import ExpertCache, ExpertKey, build_policy, policy_names
from cache.base import is_offline_only

A, B, C, D = 0, 1, 2, 3


def replay(policy, seq, capacities, scope="layer", num_layers=1, requests=None):
    """seq: list of (layer, experts); one access (step) each. requests: {index: request_id}."""
    cache = ExpertCache(policy, num_layers, capacities, scope)
    for step, (layer, experts) in enumerate(seq):
        if requests and step in requests:
            cache.start_request(requests[step])
        cache.access(layer, experts, step)
    return sum(cache.hits)


def single(*experts):
    return [(0, [e]) for e in experts]


def test_registry_lists_every_policy_and_belady_is_offline():
    assert {"lru", "lfu", "lfru", "eam", "belady", "nextuse", "adaptive"} <= set(policy_names())
    assert "belady" not in policy_names(online_only=True)
    assert is_offline_only("belady")
    with pytest.raises(ValueError, match="known policies"):
        build_policy("nope")


def test_lfu_keeps_the_frequent_expert_lru_keeps_the_recent_one():
    # A used 3 times, B once, C arrives: LFU evicts B, LRU evicts A; then A returns.
    seq = single(A, A, A, B, C, A)
    assert replay(build_policy("lru"), seq, [2]) == 2
    assert replay(build_policy("lfu"), seq, [2]) == 3


def test_lfu_decay_lets_an_old_hot_expert_go():
    # Counts at C: plain A=3, B=2 -> evict B. Decay 0.5: A=1.75*0.5^3, B=1.5*0.5 -> evict A.
    seq = single(A, A, A, B, B, C, B)
    assert replay(build_policy("lfu"), seq, [2]) == 3
    assert replay(build_policy("lfu", decay=0.5), seq, [2]) == 4


def test_lfru_between_lru_and_lfu():
    # Priorities (last tick + 2 per use) at the 7th access: A=3+6=9, B=6+4=10 -> LFRU evicts A,
    # LFU (A=3, B=2) evicts B, and B comes back.
    seq = single(A, A, A, B, C, B, C, B)
    assert replay(build_policy("lfu"), seq, [2]) == 2
    assert replay(build_policy("lfru", weight=2.0), seq, [2]) == 3
    assert replay(build_policy("lru"), seq, [2]) == 5
    assert replay(build_policy("lfru", weight=0.0), seq, [2]) == replay(build_policy("lru"), seq, [2])


def test_eam_forgets_the_previous_request_lfu_does_not():
    # Request 1: A A A B C A (EAM keeps A like LFU). Request 2: C D C. At D, LFU keeps A (count 4)
    # and evicts C; EAM matches request 1 with cosine 1/6 and keeps C (half of this request).
    seq = single(A, A, A, B, C, A, C, D, C)
    requests = {0: "r1", 6: "r2"}
    assert replay(build_policy("lru"), seq, [2], requests=requests) == 4
    assert replay(build_policy("lfu"), seq, [2], requests=requests) == 4
    assert replay(build_policy("eam"), seq, [2], requests=requests) == 5


def test_eam_works_without_request_boundaries():
    # Within one pseudo-request it counts like LFU; with window=4, C opens a new pseudo-request
    # whose EAM (just C) has cosine 0 with the old one, so A and B tie and the older A goes.
    seq = single(A, A, A, B, C, A)
    assert replay(build_policy("eam", window=8), seq, [2]) == 3
    assert replay(build_policy("eam", window=4), seq, [2]) == 2


def test_belady_evicts_the_farthest_next_use():
    seq = single(A, B, C, A, B, C)
    future = [(step, ExpertKey(layer, e)) for step, (layer, es) in enumerate(seq) for e in es]
    assert replay(build_policy("lru"), seq, [2]) == 0
    assert replay(build_policy("belady", future=future), seq, [2]) == 2


def test_belady_requires_the_future():
    with pytest.raises(ValueError, match="future"):
        build_policy("belady")


def test_nextuse_keeps_the_previous_tokens_expert_lfu_does_not():
    # At C: LFU keeps A (3 uses); nextuse sees B was used by the previous token (the layer repeated
    # 2 of 3 times, far above its frequencies: stickiness ~0.6) while A was not, and evicts A.
    seq = single(A, A, A, B, C, B)
    assert replay(build_policy("lfu"), seq, [2]) == 2
    assert replay(build_policy("nextuse"), seq, [2]) == 3


def test_nextuse_evicts_the_stalest_layer_in_a_shared_cache():
    # 3 layers, one shared pool of 2 slots, each layer always routes to expert 0.
    # LRU thrashes (0 hits); nextuse evicts the layer the forward passed longest ago
    # and keeps the one needed next: hits at token 2, layers 0 and 2.
    seq = [(layer, [0]) for _ in range(2) for layer in range(3)]
    assert replay(build_policy("lru"), seq, [2], scope="global", num_layers=3) == 0
    assert replay(build_policy("nextuse"), seq, [2], scope="global", num_layers=3) == 2


@pytest.mark.parametrize("name", ["lru", "lfu", "lfru", "eam", "nextuse", "adaptive"])
def test_every_online_policy_respects_protection(name):
    policy = build_policy(name)
    cache = ExpertCache(policy, 1, [2])
    cache.access(0, [0, 1], 0)
    keys = {ExpertKey(0, 0), ExpertKey(0, 1)}
    with pytest.raises(RuntimeError):
        policy.victim(keys, keys)
    assert policy.victim(keys, {ExpertKey(0, 0)}) == ExpertKey(0, 1)


def test_waves_leave_room_for_pinned_copies_in_flight():
    """A step wider than its scope, while a copy is in flight: waves shrink, nothing pinned is evicted."""
    from cache.base import ExpertKey, build_policy
    from cache.manager import ExpertCache

    cache = ExpertCache(build_policy("lru"), 1, [4])
    cache.access(0, [0, 1, 2, 3], 0)
    pinned = {ExpertKey(0, 0)}
    waves = cache.access(0, [0, 4, 5, 6, 7, 8, 9, 10], 1, pinned=pinned)
    assert [len(w.hits) + len(w.misses) for w in waves] == [3, 3, 2]
    assert cache.is_resident(ExpertKey(0, 0))
    evicted = [ev for w in waves for _, _, ev in w.misses if ev is not None]
    assert ExpertKey(0, 0) not in evicted
