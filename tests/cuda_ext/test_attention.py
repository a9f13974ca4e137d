"""Native decode attention against its torch reference, against torch's SDPA, and inside a model.

Tolerances: fp32 inputs: max |native - reference| <= 1e-5 (both sum in fp32, in other orders);
bf16 / fp16 inputs: <= 1e-2 of the output scale, since the output is rounded to the input's dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cuda_ext import attention, attention_reference, native_cpu
from engine.attention import NAME, attention_forward, use_native_attention

SHAPES = [  # (B, Hq, Hkv, Tq, L, Dk, Dv)
    (1, 16, 16, 1, 20, 64, 64),  # OLMoE-like decode
    (2, 8, 2, 1, 300, 128, 128),  # GQA, a longer cache
    (1, 4, 1, 1, 5, 192, 128),  # MLA-like: key width differs from value width
    (3, 6, 3, 7, 9, 72, 40),  # several query tokens, widths that leave a vector tail
    (1, 2, 2, 16, 33, 8, 8),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, seed):
    """q as transformers hands it (a transpose of [B, Tq, Hq, Dk]); k and v as prefix views of larger
    cache buffers, as the in-place KV layers hand them."""
    B, Hq, Hkv, Tq, L, Dk, Dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, Hq, Dk, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, L + 7, Dk, generator=g).to(dtype)[:, :, :L]
    v = torch.randn(B, Hkv, L + 5, Dv, generator=g).to(dtype)[:, :, 3 : L + 3]
    return q, k, v


def _mask(shape, kind, seed):
    B, Hq, _, Tq, L, _, _ = shape
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    keep = torch.rand(B, 1, Tq, L, generator=g) > 0.3
    keep[..., 0] = True
    if kind == "bool":
        return keep
    return torch.where(keep, 0.0, float("-inf")).expand(B, Hq, Tq, L).to(kind)


def _close(got, want, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-2 * want.float().abs().max().item()
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("isa", native_cpu.runnable_isas())
@pytest.mark.parametrize("mask_kind", [None, "bool", torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(native, isa, shape, dtype, mask_kind):
    native_cpu.set_isa(isa)
    try:
        q, k, v = _inputs(shape, dtype, seed=shape[4])
        mask = _mask(shape, mask_kind, seed=1)
        got = attention(q, k, v, mask, 0.3)
        want = attention_reference(q, k, v, mask, 0.3)
        _close(got, want, dtype)
    finally:
        native_cpu.set_isa(native)


@pytest.mark.parametrize("threads", [2, 5])
@pytest.mark.parametrize("mask_kind", [None, "bool", "half_dead"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_ranges_for_more_threads(native, threads, mask_kind, dtype):
    """Fewer (row, KV head) tasks than threads: each task's keys are cut into ranges whose softmax
    sums are combined after; a range with every key masked must drop out of the combination."""
    shape = (1, 4, 1, 2, 1100, 64, 48)  # one KV head, 1100 keys: 2 to 4 ranges
    q, k, v = _inputs(shape, dtype, seed=12)
    mask = _mask(shape, "bool", seed=13) if mask_kind else None
    if mask_kind == "half_dead":
        mask[..., :600] = False  # the first range (and part of the second) sees nothing
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = attention(q, k, v, mask, 0.2)
    finally:
        torch.set_num_threads(saved)
    _close(got, attention_reference(q, k, v, mask, 0.2), dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_sdpa(native, shape):
    """The reference itself is what SDPA computes (fp32, GQA by repeating KV heads)."""
    q, k, v = _inputs(shape, torch.float32, seed=2)
    Hq, Hkv = shape[1:3]
    mask = _mask(shape, "bool", seed=3)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1),
                                          attn_mask=mask, scale=0.25).transpose(1, 2)
    _close(attention(q, k, v, mask, 0.25), want, torch.float32)


def test_default_scale_and_fully_masked_rows(native):
    q, k, v = _inputs((2, 4, 2, 3, 11, 16, 16), torch.float32, seed=4)
    _close(attention(q, k, v), attention_reference(q, k, v, None, 16 ** -0.5), torch.float32)
    mask = torch.ones(2, 1, 3, 11, dtype=torch.bool)
    mask[1, :, 2] = False  # a padding query that sees nothing: zeros, never NaN
    out = attention(q, k, v, mask, 0.5)
    assert torch.isfinite(out).all()
    assert out[1, 2].abs().max().item() == 0.0
    _close(out, attention_reference(q, k, v, mask, 0.5), torch.float32)


def test_bad_shapes_raise(native):
    q, k, v = _inputs((1, 6, 4, 1, 5, 8, 8), torch.float32, seed=5)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        attention(q, k, v)
    q, k, v = _inputs((1, 4, 2, 1, 5, 8, 8), torch.float32, seed=5)
    with pytest.raises(RuntimeError, match="mask must be"):
        attention(q, k, v, torch.ones(1, 1, 1, 6, dtype=torch.bool))


def test_opcheck(native):
    q, k, v = _inputs((1, 4, 2, 2, 6, 8, 8), torch.float32, seed=6)
    torch.library.opcheck(torch.ops.moepager.attention.default, (q, k, v, _mask((1, 4, 2, 2, 6, 8, 8), "bool", 7), 0.5))


class _Module(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


@pytest.mark.parametrize("tq,with_mask", [(1, False), (1, True), (3, True)])
def test_attention_forward_matches_transformers_sdpa(native, tq, with_mask):
    """The registered function returns what transformers' sdpa function returns, in its layout."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    shape = (2, 4, 2, tq, 12, 16, 16)
    q, k, v = _inputs(shape, torch.float32, seed=8)
    mask = _mask(shape, "bool", seed=9) if with_mask else None
    with torch.no_grad():
        got, _ = attention_forward(_Module(), q, k, v, mask, scaling=0.25)
        want, _ = sdpa_attention_forward(_Module(), q, k, v, mask, scaling=0.25)
    _close(got, want, torch.float32)


def test_attention_forward_leaves_other_calls_to_sdpa(native, monkeypatch):
    """Several query tokens without a mask (sdpa's own causal mask) stay sdpa's; sinks of one logit per
    query head go to the kernel, and sinks of another shape, which sdpa cannot compute, are an error."""
    import engine.attention as ea

    calls = []
    monkeypatch.setattr(ea, "attention", lambda *a, **k: calls.append(a))
    q, k, v = _inputs((1, 4, 2, 4, 4, 16, 16), torch.float32, seed=10)
    with torch.no_grad():
        ea.attention_forward(_Module(), q, k, v, None, scaling=0.25)
    assert calls == []
    with torch.no_grad():
        ea.attention_forward(_Module(), q[:, :, :1], k, v, None, scaling=0.25)
        ea.attention_forward(_Module(), q[:, :, :1], k, v, None, scaling=0.25, s_aux=torch.ones(4))
    assert len(calls) == 2 and calls[0][5] is None and torch.equal(calls[1][5], torch.ones(4))
    with pytest.raises(ValueError, match="sinks"), torch.no_grad():
        ea.attention_forward(_Module(), q[:, :, :1], k, v, None, scaling=0.25, s_aux=torch.zeros(3))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_sinks_match_reference(native, shape, threads):
    """GPT-OSS's attention sinks: one more logit per query head, with no value; key ranges too."""
    q, k, v = _inputs(shape, torch.float32, seed=sum(shape))
    sinks = torch.randn(shape[1], generator=torch.Generator().manual_seed(3)) * 3
    mask = _mask(shape, torch.float32, 5)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in (None, mask) if shape[3] == 1 else (mask,):
            _close(attention(q, k, v, m, 0.3, sinks), attention_reference(q, k, v, m, 0.3, sinks), torch.float32)
    finally:
        torch.set_num_threads(old)
    # every key masked: the sink takes the whole softmax, the output is zero
    dead = torch.zeros(1, 1, shape[3], shape[4], dtype=torch.bool)
    assert attention(q, k, v, dead, 0.3, sinks).abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:4] + [(1, 64, 8, 1, 1000, 64, 64)])
def test_eager_rounding_matches_eager_attention(native, dtype, shape):
    """``eager=True`` rounds between the steps as transformers' eager attention does in a 16-bit dtype.
    The dot products and the weighted values are still summed in another order, so an output element
    may differ by an ulp: at most 0.5 % of them do (observed: none to 0.5 %)."""
    q, k, v = _inputs(shape, dtype, seed=sum(shape) + 1)
    sinks = (torch.randn(shape[1], generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    keep = _mask(shape, torch.bool, 7)
    mask = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)  # eager's additive mask
    for s in (None, sinks):
        for m in (None, mask) if shape[3] == 1 else (mask,):
            got = attention(q, k, v, m, 0.3, s, eager=True)
            want = attention_reference(q, k, v, m, 0.3, s, eager=True)
            assert (got != want).float().mean() <= 0.005
            _close(got, want, dtype)


def test_sinks_reference_is_gpt_oss_eager():
    """The reference's sinks and eager rounding are what GPT-OSS's own eager attention computes."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    module = _Module()
    module.num_key_value_groups, module.training = 2, False
    module.sinks = torch.randn(4, generator=torch.Generator().manual_seed(8))
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = _inputs((2, 4, 2, 3, 7, 8, 8), dtype, seed=4)
        keep = _mask((2, 4, 2, 3, 7, 8, 8), torch.bool, 6)
        mask = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
        module.sinks = module.sinks.to(dtype)
        want, _ = eager_attention_forward(module, q, k, v, mask, scaling=0.3)
        got = attention_reference(q, k, v, mask, 0.3, module.sinks, eager=True)
        if dtype == torch.float32:
            _close(got, want, dtype)
        else:
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_switches_to_native_eager_with_parity(native, tiny_model_dir, monkeypatch, dtype):
    """GPT-OSS supports no SDPA: it runs ``EAGER_NAME``, whose decode steps take the kernel with the
    sinks; greedy tokens as plain transformers' eager attention, and fp32 logits within 1e-4."""
    from transformers import AutoModelForCausalLM

    import engine.attention as ea

    path = tiny_model_dir("gpt_oss")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    assert model.config._attn_implementation == "eager"
    assert use_native_attention(model)
    assert model.config._attn_implementation == ea.EAGER_NAME
    calls, real = [], ea.attention

    def counted(*a, **k):
        calls.append(a[5] is not None and k.get("eager"))
        return real(*a, **k)

    monkeypatch.setattr(ea, "attention", counted)
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(12))
    kw = {"max_new_tokens": 16, "do_sample": False, "min_new_tokens": 16, "output_logits": True,
          "return_dict_in_generate": True}
    with torch.no_grad():
        got, want = model.generate(prompt, **kw), ref.generate(prompt, **kw)
    assert len(calls) >= 15 and all(calls)  # decode steps, with the sinks, eager rounding
    assert got.sequences.tolist() == want.sequences.tolist()
    if dtype == torch.float32:
        for a, b in zip(got.logits, want.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_model_switch_and_parity(native, tiny_model_dir, monkeypatch):
    """A CPU model on sdpa switches to the native name and keeps its logits and greedy tokens."""
    from transformers import AutoModelForCausalLM

    import engine.attention as ea

    path = tiny_model_dir("qwen2_moe")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config._attn_implementation == "sdpa"
    assert use_native_attention(model)
    assert model.config._attn_implementation == NAME
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(11))
    calls, real = [], ea.attention

    def counted(*a):
        calls.append(a[0].shape[2])
        return real(*a)

    monkeypatch.setattr(ea, "attention", counted)
    kw = {"max_new_tokens": 16, "do_sample": False, "min_new_tokens": 16, "output_logits": True,
          "return_dict_in_generate": True}
    with torch.no_grad():
        got, want = model.generate(prompt, **kw), ref.generate(prompt, **kw)
    assert len(calls) >= 15 and all(t == 1 for t in calls)  # every decode step's attention ran natively
    assert got.sequences.tolist() == want.sequences.tolist()
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_eager_models_are_not_switched(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("olmoe"), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    assert not use_native_attention(model)
    assert model.config._attn_implementation == "eager"
