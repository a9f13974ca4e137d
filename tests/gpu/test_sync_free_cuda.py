"""The hot path on CUDA makes no host sync but the marked one, and still matches the reference.

``torch.cuda.set_sync_debug_mode("error")`` is on inside the experts function for a batched
prefill that needs more experts than each layer's scope holds (waves, so copies overwrite
slots a queued wave reads) and for greedy decode steps; only ``engine.offload.routing_to_host``
(the ``# sync:`` line) may synchronize. The logits and tokens equal plain transformers'.
"""

from __future__ import annotations

import pytest
import torch

from engine import Engine, offload
from engine.generation import SamplingParams

pytestmark = pytest.mark.gpu

ATOL = 1e-4
MIN_SLOTS = 2 * 3  # top_k x MoE layers of the tiny olmoe: two slots per layer


def _reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to("cuda")


@pytest.fixture
def sync_checked(monkeypatch):
    """Sync debug mode "error" inside the experts function, except around the marked sync."""
    calls = {"layers": 0}

    def allowed(top_k_index):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return top_k_index.to("cpu")
        finally:
            torch.cuda.set_sync_debug_mode("error")

    def install(eng):
        forward = eng.runtime._forward_rows

        def checked(*args):
            calls["layers"] += 1
            torch.cuda.set_sync_debug_mode("error")
            try:
                return forward(*args)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        monkeypatch.setattr(offload, "routing_to_host", allowed)
        monkeypatch.setattr(eng.runtime, "_forward_rows", checked)
        return calls

    yield install
    torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("prefetch", ["none", "prev"])
def test_waved_prefill_has_only_the_marked_sync(tiny_model_dir, sync_checked, prefetch):
    path = tiny_model_dir("olmoe")
    ref = _reference(path)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids.to("cuda")).logits.float().cpu()
    with Engine.from_pretrained(path, device="cuda", expert_slots=MIN_SLOTS, prefetch=prefetch,
                                progress=False) as eng:
        calls = sync_checked(eng)
        got = eng.logits(ids)
        assert calls["layers"] == eng.num_moe_layers
        stats = eng.stats()
        assert stats["misses"] > MIN_SLOTS, "a 24-token prefill at two slots per layer needs waves"
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_decode_steps_have_only_the_marked_sync(tiny_model_dir, sync_checked):
    path = tiny_model_dir("olmoe")
    ref = _reference(path)
    prompt = [5, 9, 17, 33, 2, 71]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=8, do_sample=False,
                            min_new_tokens=8)[0, len(prompt):].tolist()
    with Engine.from_pretrained(path, device="cuda", expert_slots=MIN_SLOTS, progress=False) as eng:
        calls = sync_checked(eng)
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        got = [ev.token_id for ev in eng.generate([prompt], params) if ev.token_id is not None]
        assert calls["layers"] == 8 * eng.num_moe_layers  # one prefill + seven decode steps
        assert got == want
        assert eng.stats()["decode_hit_rate"] < 1.0  # decode steps fetched experts too
