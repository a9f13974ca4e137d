"""The planner's choices, by hand: what a prefetch may evict, and what happens to a wrong guess.

Each test drives a :class:`PrefetchPlanner` against a real :class:`ExpertCache`
with the calls the layer step makes (plan, on_complete, on_access, stale), no
clock: which copy landed before which plan is stated directly.
"""

from __future__ import annotations

from cache import ExpertCache, ExpertKey, build_policy
from prefetch.planner import PrefetchPlanner


def test_a_copy_whose_step_passed_unused_is_no_longer_protected():
    # Layer 1 has 2 slots. A copy of expert 2 lands, layer 1 then runs on expert 0 only: the copy was a wrong
    # guess for that step. The next plan wants expert 3 and rates expert 0 highly: it may evict the stale copy.
    cache = ExpertCache(build_policy("lru"), 2, [2, 2])
    planner = PrefetchPlanner(expert_bytes=1, budget_bytes=4, gate=False)
    cache.access(1, [0], 0)
    assert [k for k, _s, _e in planner.plan([(ExpertKey(1, 2), 0.9)], cache, set())] == [ExpertKey(1, 2)]
    planner.on_complete(ExpertKey(1, 2))
    planner.on_access(ExpertKey(1, 0))
    cache.access(1, [0], 1)
    assert planner.stale(1) == []  # nothing in flight to cancel
    issued = planner.plan([(ExpertKey(1, 3), 0.9), (ExpertKey(1, 0), 0.8)], cache, set())
    assert [(k, e) for k, _s, e in issued] == [(ExpertKey(1, 3), ExpertKey(1, 2))]
    assert planner.outcomes.as_dict() == {"issued": 2, "useful": 0, "wasted": 1, "late": 0, "cancelled": 0}


def test_a_stale_copy_used_later_still_counts_as_useful():
    cache = ExpertCache(build_policy("lru"), 2, [4, 4])
    planner = PrefetchPlanner(expert_bytes=1, budget_bytes=4, gate=False)
    planner.plan([(ExpertKey(1, 2), 0.9)], cache, set())
    planner.on_complete(ExpertKey(1, 2))
    planner.stale(1)
    planner.on_access(ExpertKey(1, 2))  # the next token uses it
    assert (planner.outcomes.useful, planner.outcomes.wasted) == (1, 0)


def test_a_prefetch_evicts_a_candidate_rated_lower_never_one_rated_higher():
    # Layer 1's 2 slots hold experts 0 and 1, both candidates (0.9 and 0.3). Expert 2 (0.6) is not resident:
    # with no unnamed expert to evict it displaces expert 1, rated below it, not expert 0.
    cache = ExpertCache(build_policy("lru"), 2, [2, 2])
    planner = PrefetchPlanner(expert_bytes=1, budget_bytes=4, gate=False)
    cache.access(1, [0], 0)
    cache.access(1, [1], 1)
    scored = [(ExpertKey(1, 0), 0.9), (ExpertKey(1, 1), 0.3), (ExpertKey(1, 2), 0.6)]
    issued = planner.plan(scored, cache, set())
    assert [(k, e) for k, _s, e in issued] == [(ExpertKey(1, 2), ExpertKey(1, 1))]
    # Expert 3 (0.2) is rated below every resident expert: no slot for it.
    planner.on_complete(ExpertKey(1, 2))
    assert planner.plan([*scored, (ExpertKey(1, 3), 0.2)], cache, set()) == []
