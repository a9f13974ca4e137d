"""The fused attention block at decode: ``qkv_rope`` against its reference, and attention modules
swapped by ``engine.attention.use_decode_blocks`` against their own forward.

Tolerances: the op is bit-identical to its reference in every dtype without norms. With norms,
within 4 ulp of the largest output (``finfo(dtype).eps * max |out|``): the native RMSNorm adds its
squares in another order (``tests/engine/test_native_norms.py``), and an ulp of a normed q can
move a rotated element by an ulp of its operands. The engine with fused blocks gives the same greedy
tokens and bit-identical logits as with the modules' own forwards, because the probe that swaps a
class demands bit-identical outputs.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES

import engine.attention as ea
from cuda_ext import qkv_rope, qkv_rope_into, qkv_rope_into_reference, qkv_rope_reference
from engine import Engine
from engine.generation import SamplingParams

FUSED = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe"}  # the usual q/k/v/o shape
NOT_FUSED = {"deepseek_v2", "deepseek_v3", "gpt_oss"}  # MLA; GPT-OSS's sinks (and eager attention)


def _inputs(hq, hkv, d, B, T, cos_rows, norm, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(B, T, (hq + 2 * hkv) * d, generator=g) * 2).to(dtype)
    cos = torch.randn(cos_rows, T, d, generator=g).to(dtype)
    sin = torch.randn(cos_rows, T, d, generator=g).to(dtype)
    q_w = k_w = None
    if norm == "full":  # OLMoE: one norm over the whole q (k) projection
        q_w, k_w = (torch.rand(hq * d, generator=g) + 0.5).to(dtype), (torch.rand(hkv * d, generator=g) + 0.5).to(dtype)
    elif norm == "head":  # Qwen3: one norm per head
        q_w, k_w = (torch.rand(d, generator=g) + 0.5).to(dtype), (torch.rand(d, generator=g) + 0.5).to(dtype)
    return y, cos, sin, q_w, k_w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", [None, "full", "head"])
@pytest.mark.parametrize("hq,hkv,d,B,T,cos_rows", [(4, 4, 16, 1, 1, 1), (8, 2, 32, 3, 2, 3), (6, 3, 10, 2, 7, 1),
                                                    (2, 1, 64, 1, 16, 1)])
def test_qkv_rope_matches_reference(native, dtype, norm, hq, hkv, d, B, T, cos_rows):
    y, cos, sin, q_w, k_w = _inputs(hq, hkv, d, B, T, cos_rows, norm, dtype, seed=hq * 100 + T)
    for mode in (0, 1):
        got = qkv_rope(y, cos, sin, hq, hkv, q_w, k_w, 1e-5, mode)
        want = qkv_rope_reference(y, cos, sin, hq, hkv, q_w, k_w, 1e-5, mode)
        assert [t.shape for t in got] == [(B, hq, T, d), (B, hkv, T, d), (B, hkv, T, d)]
        for a, b in zip(got, want):
            assert a.dtype == dtype and a.is_contiguous()
            if norm is not None:  # the norm's sum of squares is added in another order: an ulp here and there
                atol = 4 * torch.finfo(dtype).eps * b.abs().max().item()
                torch.testing.assert_close(a, b, atol=atol, rtol=0)
            else:
                assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [None, "head"])
def test_qkv_rope_into_writes_the_cache_buffers(native, dtype, norm):
    """k and v land in the buffers at [pos, pos + T) and nothing else there moves; q as qkv_rope's."""
    hq, hkv, d, B, T, pos, cap = 4, 2, 16, 2, 3, 5, 11
    y, cos, sin, q_w, k_w = _inputs(hq, hkv, d, B, T, B, norm, dtype, seed=9)
    g = torch.Generator().manual_seed(1)
    bufs = [torch.randn(B, hkv, cap, d, generator=g).to(dtype) for _ in range(2)]
    want_bufs = [b.clone() for b in bufs]
    want_q = qkv_rope_into_reference(y, cos, sin, hq, hkv, q_w, k_w, 1e-6, 0, *want_bufs, pos)
    q = qkv_rope_into(y, cos, sin, hq, hkv, q_w, k_w, 1e-6, 0, *bufs, pos)
    q2, k2, v2 = qkv_rope(y, cos, sin, hq, hkv, q_w, k_w, 1e-6, 0)
    assert torch.equal(q, q2) and torch.equal(bufs[0][:, :, pos:pos + T], k2) and torch.equal(bufs[1][:, :, pos:pos + T], v2)
    assert torch.equal(bufs[0][:, :, :pos], want_bufs[0][:, :, :pos]) and torch.equal(bufs[1][:, :, pos + T:], want_bufs[1][:, :, pos + T:])
    if norm is None or dtype != torch.float32:  # fp32 norms: within an ulp (see the module docstring)
        assert torch.equal(q, want_q) and all(torch.equal(a, b) for a, b in zip(bufs, want_bufs))
    with pytest.raises(RuntimeError, match="k_out/v_out"):
        qkv_rope_into(y, cos, sin, hq, hkv, q_w, k_w, 1e-6, 0, bufs[0], bufs[1], cap - 1)


def test_qkv_rope_into_opcheck(native):
    y, cos, sin, q_w, k_w = _inputs(4, 2, 8, 2, 3, 1, "full", torch.float32, seed=5)
    bufs = [torch.randn(2, 2, 9, 8) for _ in range(2)]
    torch.library.opcheck(torch.ops.moepager.qkv_rope_into.default, (y, cos, sin, 4, 2, q_w, k_w, 1e-6, 0, *bufs, 4))


def test_growing_layer_room_then_grow_equals_update():
    from engine.kv_rows import GrowingLayer

    g = torch.Generator().manual_seed(3)
    a, b = GrowingLayer(), GrowingLayer()
    assert a.room((1, 2, 1, 4), torch.float32, torch.device("cpu")) is None  # before the first update
    first = [torch.randn(1, 2, 3, 4, generator=g) for _ in range(2)]
    a.update(*first)
    b.update(*first)
    for t in (1, 2, 40):  # 40 outgrows the buffer: the history moves to a larger one
        k, v = torch.randn(1, 2, t, 4, generator=g), torch.randn(1, 2, t, 4, generator=g)
        want = a.update(k, v)
        kbuf, vbuf, n = b.room((1, 2, t, 4), torch.float32, torch.device("cpu"))
        kbuf[:, :, n:n + t], vbuf[:, :, n:n + t] = k, v
        got = b.grow(t)
        assert all(torch.equal(x, y) for x, y in zip(got, want))
        assert got[0] is b.keys and got[1] is b.values


def test_qkv_rope_reference_is_transformers_rotary():
    """The reference is transformers' own ``apply_rotary_pos_emb`` on the split heads."""
    from transformers.models.mixtral.modeling_mixtral import apply_rotary_pos_emb

    y, cos, sin, _, _ = _inputs(4, 2, 8, 2, 3, 2, None, torch.bfloat16, seed=3)
    q, k, v = qkv_rope_reference(y, cos, sin, 4, 2, None, None, 1e-6, 0)
    heads = y.view(2, 3, 8, 8).transpose(1, 2)  # [B, 4 + 2 + 2, T, D]
    qe, ke = apply_rotary_pos_emb(heads[:, :4], heads[:, 4:6], cos, sin)
    assert torch.equal(q, qe) and torch.equal(k, ke) and torch.equal(v, heads[:, 6:])


def test_qkv_rope_bad_input(native):
    y = torch.randn(1, 1, 40)
    cos = torch.randn(1, 1, 8)
    with pytest.raises(RuntimeError, match="hq \\+ 2 hkv"):
        qkv_rope(y, cos, cos, 3, 2)
    with pytest.raises(RuntimeError, match="cos/sin must be"):
        qkv_rope(y, cos[..., :4], cos[..., :4], 3, 1)
    with pytest.raises(RuntimeError, match="norm weight"):
        qkv_rope(y, cos, cos, 3, 1, torch.ones(5), torch.ones(8))


def test_qkv_rope_opcheck(native):
    y, cos, sin, q_w, k_w = _inputs(4, 2, 8, 2, 3, 1, "full", torch.float32, seed=5)
    torch.library.opcheck(torch.ops.moepager.qkv_rope.default, (y, cos, sin, 4, 2, q_w, k_w, 1e-6, 0))


def _greedy(eng, n=20):
    out = []
    for ev in eng.generate([[5, 6, 7, 8, 9, 10, 11]], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)):
        if ev.token_id is not None:
            out.append(ev.token_id)
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_fuses_usual_blocks_with_same_output(native, tiny_model_dir, arch, dtype):
    path = tiny_model_dir(arch)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with Engine.from_pretrained(path, device="cpu", dtype=dtype, progress=False) as eng:
        assert (eng.decode_blocks > 0) == (arch in FUSED)
        assert eng.kernels()["attention_blocks_fused"] == eng.decode_blocks
        calls, into, fast, real_into = [], [], ea._DecodeBlock._moepager_fast, ea.qkv_rope_into

        def counted(self, *a):
            out = fast(self, *a)
            calls.append(out is not None)
            return out

        ea._DecodeBlock._moepager_fast = counted
        ea.qkv_rope_into = lambda *a: into.append(1) or real_into(*a)
        try:
            fused_tokens = _greedy(eng)
            fused_logits = eng.logits(ids)
        finally:
            ea._DecodeBlock._moepager_fast = fast
            ea.qkv_rope_into = real_into
        if arch in FUSED:  # every decode step of every layer went the fast way; the prefills did not
            assert sum(calls) >= 19 * eng.decode_blocks and not all(calls)
            # and wrote k and v straight into the in-place cache layers (all but a first forward, whose
            # update initialises the layer)
            assert 19 * eng.decode_blocks <= len(into) <= sum(calls)
        assert ea.set_decode_blocks(eng.model, False) == eng.decode_blocks
        assert not any(isinstance(m, ea._DecodeBlock) for m in eng.model.modules())
        assert _greedy(eng) == fused_tokens
        assert torch.equal(eng.logits(ids), fused_logits)
        assert ea.set_decode_blocks(eng.model, True) == eng.decode_blocks
        assert sum(isinstance(m, ea._DecodeBlock) for m in eng.model.modules()) == eng.decode_blocks


@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe", "qwen2_moe"])
def test_int8_dense_blocks_fuse_with_same_output(native, tiny_model_dir, arch):
    """With int8 dense layers the fused projection is the int8 kernel's; bf16 compute, as served."""
    path = tiny_model_dir(arch)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    with Engine.from_pretrained(path, device="cpu", dtype="bfloat16", dense_dtype="int8", progress=False) as eng:
        assert eng.int8_dense > 0 and eng.decode_blocks > 0
        fused_tokens, fused_logits = _greedy(eng), eng.logits(ids)
        ea.set_decode_blocks(eng.model, False)
        assert _greedy(eng) == fused_tokens
        assert torch.equal(eng.logits(ids), fused_logits)


def test_probe_rejects_a_module_that_computes_otherwise(native, tiny_model_dir, monkeypatch):
    """An attention class whose forward differs from the usual computation keeps its own forward."""
    from transformers.models.olmoe import modeling_olmoe as mo

    own = mo.OlmoeAttention.forward

    def scaled(self, *a, **k):
        out, w = own(self, *a, **k)
        return out * 1.0001, w

    monkeypatch.setattr(mo.OlmoeAttention, "forward", scaled)
    with Engine.from_pretrained(tiny_model_dir("olmoe"), device="cpu", progress=False) as eng:
        assert eng.native_attention and eng.decode_blocks == 0
        assert not any(isinstance(m, ea._DecodeBlock) for m in eng.model.modules())
