"""The planner keeps its estimates per phase: a link idle at prefill can be the bottleneck at decode.

A prefill layer computes many tokens, so a copy issued there lands before the next layer and
is used; a decode layer computes one token, and the same copy is still in flight when its
layer needs it. Driven by hand with the calls the layer step makes (plan, on_complete,
on_access), no clock.
"""

from __future__ import annotations

from cache import ExpertCache, ExpertKey, build_policy
from cache.step import DECODE, PREFILL
from prefetch.planner import PrefetchPlanner


def _planner_and_cache():
    return PrefetchPlanner(expert_bytes=1, budget_bytes=4, gate=True), ExpertCache(build_policy("lru"), 2, [64, 64])


def _prefill_round(planner, cache, expert: int) -> bool:
    """A prefill plan for one candidate; the copy lands before the next plan and is used."""
    key = ExpertKey(1, expert)
    issued = [k for k, _s, _e in planner.plan([(key, 0.9)], cache, set(), PREFILL)]
    if issued:
        planner.on_complete(key)
    planner.on_access(key)
    return bool(issued)


def test_decode_does_not_inherit_an_idle_prefill_link():
    planner, cache = _planner_and_cache()
    prefill = [_prefill_round(planner, cache, e) for e in range(20)]
    assert all(prefill[2:]), prefill  # the prefill gate opened: its copies land in time and are used
    decode = []
    for e in range(20, 40):  # at decode every copy is still in flight when its layer needs it
        key = ExpertKey(1, e)
        issued = [k for k, _s, _e in planner.plan([(key, 0.9)], cache, set(), DECODE)]
        decode.append(bool(issued))
        planner.on_access(key)  # late: counted, and the decode estimates learn a busy link
    # Only the exploring copies: the 1st, 2nd and 4th candidate turned down, then, on a link measured
    # busy, the 16th (not the 8th). With one set of estimates the prefill samples would open the decode
    # gate for all 20.
    assert [i + 1 for i, issued in enumerate(decode) if issued] == [1, 2, 4, 16], decode
    assert planner.outcomes.late == 4
    assert planner.occupancy == 1.0 and planner.gain < 0.1  # the latest plan's phase: decode
    assert _prefill_round(planner, cache, 40)  # prefill's own estimates are untouched
    assert planner.occupancy < 0.1 and planner.gain > 0.9


def test_an_outcome_feeds_the_phase_that_issued_the_copy():
    # A copy issued at prefill and used late, after a decode plan: the prefill estimates learn it.
    planner, cache = _planner_and_cache()
    assert _prefill_round(planner, cache, 0)  # the 1st candidate turned down is copied to explore
    key = ExpertKey(1, 1)
    assert [k for k, _s, _e in planner.plan([(key, 0.9)], cache, set(), PREFILL)] == [key]
    planner.plan([], cache, set(), DECODE)
    planner.on_access(key)  # still in flight: late
    assert planner.gain == 0.05 and planner.occupancy == 1.0  # decode: nothing sampled yet
    planner.plan([], cache, set(), PREFILL)
    assert 0.05 < planner.gain < 1.0 and 0.0 < planner.occupancy < 1.0
