"""The affinity replay (deploy/ray/affinity_sim.py) on hand-computed cases, and the pure pieces of
the Ray app: affinity keys and the merged, replica-labelled metrics page."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deploy.ray.affinity import affinity_key
from deploy.ray.affinity_sim import (
    Turn,
    affinity_table,
    conversations_from_trace,
    interleave,
    replay,
    route,
    synthetic_conversations,
    warm_turn_share,
)


def _turn(conversation: int, index: int, experts: tuple[int, ...]) -> Turn:
    return Turn(conversation, index, steps=((experts,),), phases=(0,), tokens=len(experts))


def test_replay_hand_computed_affinity_beats_alternation():
    # A uses experts {0, 1}, B uses {2, 3}; 1 layer, 2 slots per replica; arrivals A0 B0 B1 A1.
    a0, b0, b1, a1 = _turn(0, 0, (0, 1)), _turn(1, 0, (2, 3)), _turn(1, 1, (2, 3)), _turn(0, 1, (0, 1))
    turns = [a0, b0, b1, a1]
    kwargs = {"slots_per_layer": 2, "layers": 1, "experts": 4}
    alternating = replay(turns, [0, 1, 0, 1], 2, **kwargs)  # what round-robin does to this order
    assert alternating["hit_rate"] == 0.0  # every replica sees A then B: all 8 lookups miss
    homed = replay(turns, [0, 1, 1, 0], 2, **kwargs)
    assert homed["hit_rate"] == pytest.approx(4 / 8)  # the second turns hit both experts
    assert warm_turn_share(turns, [0, 1, 1, 0]) == 1.0 and warm_turn_share(turns, [0, 1, 0, 1]) == 0.0


def test_replay_uses_the_named_cache_policy():
    # 2 slots, accesses 0 0 0 1 2 0: when 2 arrives LRU evicts 0 (used longest ago) and misses it
    # again; LFU evicts 1 (used once) and hits 0.
    turns = [_turn(0, i, (e,)) for i, e in enumerate((0, 0, 0, 1, 2, 0))]
    kwargs = {"slots_per_layer": 2, "layers": 1, "experts": 3}
    assert replay(turns, [0] * 6, 1, policy="lru", **kwargs)["hit_rate"] == pytest.approx(2 / 6)
    assert replay(turns, [0] * 6, 1, policy="lfu", **kwargs)["hit_rate"] == pytest.approx(3 / 6)


def test_routing_policies():
    convos = synthetic_conversations(conversations=6, turns=3, layers=2, experts=8, topic_experts=2, top_k=2,
                                     prompt_tokens=4, decode_tokens=2, seed=1)
    turns = interleave(convos, seed=3)
    assert [(t.conversation, t.index) for t in turns if t.conversation == 2] == [(2, 0), (2, 1), (2, 2)]
    assert route(turns, "round_robin", 3) == [i % 3 for i in range(len(turns))]
    homed = route(turns, "affinity", 3, utilization=0.5, max_imbalance=100)
    assert warm_turn_share(turns, homed) == 1.0
    assert len(set(homed)) == 3  # new conversations still spread by load
    strict = route(turns, "affinity", 3, utilization=3.0, max_imbalance=0)  # overloaded: homes must yield
    assert warm_turn_share(turns, strict) < 1.0
    with pytest.raises(ValueError, match="known: round_robin"):
        route(turns, "random", 3)


def test_affinity_wins_on_few_focused_conversations():
    convos = synthetic_conversations(conversations=4, turns=4, layers=4, experts=32, topic_experts=4,
                                     locality=0.98, prompt_tokens=8, decode_tokens=8)
    rows = {r["routing"]: r for r in affinity_table(convos, replicas=2, slots_per_layer=8, layers=4, experts=32,
                                                    seeds=(0, 1))}
    assert rows["affinity"]["warm_turn_share"] == 1.0
    assert rows["affinity"]["prefill_hit_rate"] > rows["round_robin"]["prefill_hit_rate"]


def test_conversations_from_trace_groups_requests():
    from traces.format import Trace

    experts = np.array([[[0, 1]], [[2, 3]], [[0, 1]], [[1, 2]]], dtype=np.int16)  # 4 rows, 1 layer, top-2
    trace = Trace(experts=experts, weights=np.ones_like(experts, dtype=np.float16),
                  request=np.array([7, 7, 9, 9], dtype=np.int32), position=np.array([0, 1, 0, 1], dtype=np.int32),
                  phase=np.array([0, 1, 0, 1], dtype=np.int8), meta={"conversations": [[7, 9]]})
    (convo,) = conversations_from_trace(trace)
    assert [t.index for t in convo] == [0, 1] and convo[0].tokens == 2
    assert convo[0].steps == (((0, 1),), ((2, 3),)) and convo[0].phases == (0, 1)
    del trace.meta["conversations"]
    assert len(conversations_from_trace(trace)) == 2


def test_affinity_keys():
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi fox"}]}
    later = {"messages": chat["messages"] + [{"role": "assistant", "content": "Hello"},
                                             {"role": "user", "content": "More"}]}
    other = {"messages": [chat["messages"][0], {"role": "user", "content": "Hi owl"}]}
    key = affinity_key({}, json.dumps(chat).encode())
    assert key.startswith("prefix:") and key == affinity_key({}, json.dumps(later).encode())
    assert key != affinity_key({}, json.dumps(other).encode())
    assert affinity_key({"x-conversation-id": "c1"}, b"{}") == "conv:c1"
    assert affinity_key({}, json.dumps({"prompt": "abc" * 200}).encode()) == \
        affinity_key({}, json.dumps({"prompt": "abc" * 200 + "more"}).encode())
    assert affinity_key({}, b"not json") is None and affinity_key({}, json.dumps({"prompt": ["a", "b"]})) is None


def test_merged_metrics_label_every_replica():
    from prometheus_client.parser import text_string_to_metric_families

    from deploy.ray.metrics import AffinityMetrics, merge_replica_metrics

    pages = {}
    for replica, hits in (("r1", 3), ("r2", 5)):
        affinity = AffinityMetrics()
        for _ in range(hits):
            assert affinity.observe(replica, replica) == "hit"
        assert affinity.observe(None, replica) == "new" and affinity.observe("other", replica) == "moved"
        pages[replica] = ('# HELP moepager_num_requests_running x\n# TYPE moepager_num_requests_running gauge\n'
                          f'moepager_num_requests_running {hits}.0\n') + affinity.render()
    families = {f.name: f for f in text_string_to_metric_families(merge_replica_metrics(pages).decode())}
    running = {s.labels["replica"]: s.value for s in families["moepager_num_requests_running"].samples}
    assert running == {"r1": 3.0, "r2": 5.0}
    hits = {s.labels["replica"]: s.value for s in families["moepager_affinity_requests"].samples
            if s.name.endswith("_total") and s.labels["outcome"] == "hit"}
    assert hits == {"r1": 3.0, "r2": 5.0}


def test_stream_cut_by_a_dead_replica_ends_with_an_error_event():
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
    import asyncio

    from deploy.ray.app import OpenAIIngress

    async def dying_stream():
        yield b'data: {"choices": []}\n\n'
        raise ray.exceptions.RayActorError()

    async def collect() -> list[bytes]:
        return [chunk async for chunk in OpenAIIngress._rest(None, dying_stream())]

    chunks = asyncio.run(collect())
    assert chunks[0].startswith(b"data: {") and b'"error"' in chunks[1] and chunks[1].endswith(b"data: [DONE]\n\n")


class _Replicas:
    """A deployment handle whose first ``deaths`` calls answer headers, then die before the body."""

    def __init__(self, ray, deaths: int) -> None:
        self.ray, self.deaths, self.calls = ray, deaths, 0
        self.handle = self

    def options(self, stream: bool):
        return self

    def remote(self, forwarded):
        from deploy.ray.protocol import ResponseStart

        self.calls += 1
        dies = self.calls <= self.deaths

        async def answer():
            yield ResponseStart(200, (("content-type", "application/json"), ("x-moepager-replica", str(self.calls))))
            if dies:
                raise self.ray.exceptions.RayActorError()
            yield b'{"choices": '
            yield b'[]}'
        return answer()


class _Request:
    method = "POST"

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.headers = {"content-type": "application/json"}
        self.url = type("URL", (), {"path": "/v1/chat/completions", "query": ""})()

    async def body(self) -> bytes:
        return self._body


@pytest.mark.parametrize("deaths, status", [(1, 200), (2, 200), (3, 503)])
def test_whole_body_answer_cut_by_a_dead_replica_is_retried(deaths, status):
    import types

    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
    import asyncio

    from deploy.ray.app import OpenAIIngress

    ingress = types.SimpleNamespace(_replica=_Replicas(ray, deaths), _prefix_chars=64, _attempts=3)
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    response = asyncio.run(OpenAIIngress.forward(ingress, "v1/chat/completions", _Request(body)))
    assert response.status_code == status, response.body
    assert ingress._replica.calls == min(deaths + 1, 3)
    if status == 200:  # the client gets the survivor's whole answer, never a cut one
        assert response.body == b'{"choices": []}'
        assert response.headers["x-moepager-replica"] == str(deaths + 1)
    else:
        assert b"after 3 attempts" in response.body
