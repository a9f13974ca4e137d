"""Engine features around the hot path: traces, prefetch, cache-aware routing, policy swap."""

import pytest
import torch

from engine import Engine
from engine.generation import SamplingParams
from prefetch.base import predictor_names

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 9, 17, 33], [7, 7, 40, 41, 42, 90, 3], [11]]


def _run(path, **kw):
    with Engine.from_pretrained(path, device="cpu", progress=False, **kw) as eng:
        tokens = {}
        for ev in eng.generate(PROMPTS, GREEDY):
            if ev.token_id is not None:
                tokens.setdefault(ev.request_id, []).append(ev.token_id)
        logits = eng.logits(torch.tensor([PROMPTS[1]]))
        return tokens, logits, eng.stats()


def test_batched_generate_matches_one_at_a_time(tiny_model_dir):
    path = tiny_model_dir("qwen3_moe")
    together, _, _ = _run(path, expert_slots=6)
    with Engine.from_pretrained(path, device="cpu", progress=False, expert_slots=6) as eng:
        for i, prompt in enumerate(PROMPTS):
            alone = [ev.token_id for ev in eng.generate([prompt], GREEDY) if ev.token_id is not None]
            assert alone == together[i]


@pytest.mark.parametrize("predictor", [p for p in predictor_names(online_only=True) if p not in ("none", "learned")])
def test_prefetch_never_changes_outputs(tiny_model_dir, predictor):
    path = tiny_model_dir("deepseek_v3")
    base_tokens, base_logits, _ = _run(path, expert_slots=8)
    tokens, logits, stats = _run(path, expert_slots=8, prefetch=predictor, prefetch_lookahead=2,
                                 emulate_link_gbps=5.0)
    assert tokens == base_tokens
    # Prefetched copies pin slots, so a step may split into other waves than without prefetching; the
    # native kernel sums each wave's experts in fp32, so only the order of those sums may differ.
    torch.testing.assert_close(logits, base_logits, atol=1e-5, rtol=0)
    p = stats["prefetch"]
    assert p["issued"] > 0, "nothing was prefetched: the outputs were compared without prefetching"
    assert p["useful"] + p["wasted"] + p["late"] <= p["issued"]


def test_trace_replay_matches_live_counters(tiny_model_dir, tmp_path):
    from traces.format import load_trace
    from traces.simulate import SimConfig, simulate

    path = tiny_model_dir("olmoe")
    trace_path = tmp_path / "t.safetensors"
    for policy in ("lru", "lfu", "eam"):
        with Engine.from_pretrained(path, device="cpu", progress=False, expert_slots=9, cache_policy=policy,
                                    record_trace=str(trace_path)) as eng:
            for _ in eng.generate(PROMPTS, GREEDY):
                pass
            for _ in eng.generate([[3, 4, 5, 6]], GREEDY):
                pass
            live = eng.stats()
            capacities = tuple(eng.cache.capacities)
        trace = load_trace(trace_path)
        assert trace.num_layers == 3 and trace.top_k == 2
        assert len(set(trace.request.tolist())) == 4  # request ids stay unique across generate calls
        sim = simulate(trace, SimConfig(policy=policy, capacities=capacities, scope="layer")).as_dict()
        assert (sim["hits"], sim["accesses"]) == (live["hits"], live["queries"]), policy


def test_cache_aware_routing_zero_delta_is_identical(tiny_model_dir):
    path = tiny_model_dir("mixtral")
    base_tokens, base_logits, _ = _run(path, expert_slots=6)
    tokens, logits, stats = _run(path, expert_slots=6, cache_aware_routing=0.0)
    assert tokens == base_tokens
    assert torch.equal(logits, base_logits)
    assert stats["routing_substitutions"] == 0


def test_cache_aware_routing_substitutes_and_raises_hit_rate(tiny_model_dir):
    path = tiny_model_dir("mixtral")
    _, _, base = _run(path, expert_slots=6)
    _, _, routed = _run(path, expert_slots=6, cache_aware_routing=0.9)
    assert routed["routing_substitutions"] > 0
    assert routed["hit_rate"] > base["hit_rate"]


def test_policy_swap_keeps_outputs(tiny_model_dir):
    path = tiny_model_dir("olmoe")
    with Engine.from_pretrained(path, device="cpu", progress=False, expert_slots=6) as eng:
        ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
        before = eng.logits(ids)
        eng.set_cache_policy("lfu")
        assert eng.stats()["cache_policy"] == "lfu"
        torch.testing.assert_close(eng.logits(ids), before, atol=0, rtol=0)
        with pytest.raises(ValueError, match="known policies"):
            eng.set_cache_policy("nope")
        with pytest.raises(ValueError, match="simulator"):
            eng.set_cache_policy("belady")


def test_emulated_link_stalls_are_measured(tiny_model_dir):
    path = tiny_model_dir("olmoe")
    # 8 KB pages over a 0.01 GB/s link: ~0.6 ms per copy, so stalls are clearly visible.
    _, _, slow = _run(path, expert_slots=6, emulate_link_gbps=0.01)
    assert slow["stall_seconds"] > slow["misses"] * 0.0004


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])
def test_host_computed_misses_keep_outputs(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    base_tokens, base_logits, base = _run(path, expert_slots=6)
    tokens, logits, stats = _run(path, expert_slots=6, cpu_compute="always")
    assert tokens == base_tokens
    torch.testing.assert_close(logits, base_logits, atol=1e-5, rtol=0)
    assert stats["cpu_computed"] > 0
    assert stats["bytes_transferred"] < base["bytes_transferred"]
    assert stats["queries"] == base["queries"]  # host-computed misses still count as cache queries


def test_cost_model_prefers_host_on_a_slow_link(tiny_model_dir):
    path = tiny_model_dir("olmoe")
    # a 1 MB/s link makes every copy far slower than a tiny host matmul
    _, _, stats = _run(path, expert_slots=6, cpu_compute="auto", emulate_link_gbps=0.001)
    assert stats["cpu_compute"]["fetch_seconds"] > stats["cpu_compute"]["host_seconds_1"]
    assert stats["cpu_computed"] > 0


def test_all_experts_fit_starts_warm_and_matches_the_simulator(tiny_model_dir, tmp_path):
    from traces.format import load_trace
    from traces.simulate import SimConfig, simulate

    path = tiny_model_dir("olmoe")
    trace_path = tmp_path / "all.safetensors"
    with Engine.from_pretrained(path, device="cpu", progress=False, record_trace=str(trace_path)) as eng:
        assert eng.stats()["expert_cache_used_bytes"] == eng.stats()["expert_cache_capacity_bytes"]
        for _ in eng.generate(PROMPTS, GREEDY):
            pass
        live = eng.stats()
        capacities = tuple(eng.cache.capacities)
    assert live["misses"] == 0 and live["bytes_transferred"] == 0
    sim = simulate(load_trace(trace_path), SimConfig(policy="lru", capacities=capacities)).as_dict()
    assert (sim["hits"], sim["accesses"]) == (live["hits"], live["queries"])


def test_predictor_sees_each_steps_input_tokens(tiny_model_dir):
    """The engine hands every forward's input token ids (the rows its layers route) to the predictor."""
    path = tiny_model_dir("qwen3_moe")
    with Engine.from_pretrained(path, device="cpu", progress=False, expert_slots=8, prefetch="prev") as eng:
        seen = []
        eng.runtime.prefetching.predictor.observe_tokens = lambda ids: seen.append([int(t) for t in ids])
        out = [ev.token_id for ev in eng.generate([PROMPTS[1]], GREEDY) if ev.token_id is not None]
    assert seen[0] == PROMPTS[1]  # the prompt's forward
    assert seen[1:] == [[t] for t in out[:-1]]  # then each decode forward reads the token sampled before it


def test_predictor_tokens_skip_padding_rows(tiny_model_dir):
    """A left-padded batched prefill: only the real rows' ids, one per row the experts see."""
    path = tiny_model_dir("qwen3_moe")
    with Engine.from_pretrained(path, device="cpu", progress=False, expert_slots=8, prefetch="prev") as eng:
        seen = []
        eng.runtime.prefetching.predictor.observe_tokens = lambda ids: seen.append([int(t) for t in ids])
        for _ in eng.generate(PROMPTS, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)):
            pass
    assert seen[0] == [t for p in PROMPTS for t in p]
    assert all(len(ids) == len(PROMPTS) for ids in seen[1:])  # decode: one id per sequence
