"""Quantized host pages (--expert-dtype int8 / int4), the page cache, and the native CPU path.

Tolerances (stated once, checked per architecture): with one MoE layer (routing is then computed
from exact inputs, so no expert choice can flip), the engine's float32 logits with int8 pages stay
within a relative RMS error of 2 % of the float pages' logits, and int4 pages (group 32) within 25 %.
The tiny models have random weights of std 0.2, the worst case for per-channel quantization.
On the embedded model (trained weights), held-out perplexity with int8 pages is within 1 % of the
float pages' and int4 within 5 %.

``--dense-dtype int8`` (attention projections, shared experts, LM head in int8): logits within 4 %
relative RMS of the float model's, alone and with int8 pages; here the router's input is computed
through int8 projections, so the bound covers a near-tie routing flip too (none was seen: the
largest measured was 3.1 %, DeepSeek-V3 with int8 pages too). Held-out perplexity of the embedded model with int8 pages and int8
dense layers is within 1 % of the float model's.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES

from engine import Engine
from engine.errors import MoepagerError

INT8_RMS = 0.02
INT4_RMS = 0.25
DENSE_INT8_RMS = 0.04


def _one_moe_layer_model(tiny_model_dir, arch: str) -> Path:
    # DeepSeek's first layer is dense: two layers leave exactly one MoE layer.
    return tiny_model_dir(arch, layers=2 if arch.startswith("deepseek") else 1, hidden=64, expert_intermediate=32)


def _logits(path, ids, cache_dir, **kw) -> torch.Tensor:
    with Engine.from_pretrained(str(path), device="cpu", progress=False, quant_cache_dir=str(cache_dir), **kw) as eng:
        return eng.logits(ids)


def _rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_quantized_logits_within_bound(tiny_model_dir, tmp_path, arch):
    path = _one_moe_layer_model(tiny_model_dir, arch)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    want = _logits(path, ids, tmp_path)
    int8 = _logits(path, ids, tmp_path, expert_dtype="int8")
    int4 = _logits(path, ids, tmp_path, expert_dtype="int4")
    assert 0 < _rel_rms(int8, want) < INT8_RMS
    assert _rel_rms(int8, want) < _rel_rms(int4, want) < INT4_RMS


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_int8_dense_logits_within_bound(tiny_model_dir, tmp_path, arch):
    path = _one_moe_layer_model(tiny_model_dir, arch)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    want = _logits(path, ids, tmp_path)
    with Engine.from_pretrained(str(path), device="cpu", progress=False, quant_cache_dir=str(tmp_path),
                                dense_dtype="int8") as eng:
        dense = eng.logits(ids)
        k = eng.kernels()
        linears = [m for m in eng.model.modules() if type(m) is torch.nn.Linear]  # routers subclass it: kept
    assert k["dense_int8_layers"] >= 3  # the LM head and attention projections at least
    assert all(m.out_features < 8 for m in linears)  # only gates too small to matter stay in float
    both = _logits(path, ids, tmp_path, dense_dtype="int8", expert_dtype="int8")
    assert 0 < _rel_rms(dense, want) < DENSE_INT8_RMS
    assert 0 < _rel_rms(both, want) < DENSE_INT8_RMS


def test_int8_dense_halves_dense_bytes_and_rejects_bad_values(tiny_model_dir, tmp_path):
    from engine.dense import dense_bytes

    path = _one_moe_layer_model(tiny_model_dir, "olmoe")
    with Engine.from_pretrained(str(path), device="cpu", dtype="bfloat16", progress=False) as eng:
        plain = dense_bytes(eng.model)
    with Engine.from_pretrained(str(path), device="cpu", dtype="bfloat16", progress=False, dense_dtype="int8") as eng:
        int8 = dense_bytes(eng.model)
        assert eng.kernels()["dense_int8_layers"] > 0
    assert 0.45 * plain < int8 < 0.75 * plain  # weights halve; norms, routers and scales stay
    with pytest.raises(MoepagerError, match="--dense-dtype"):
        Engine.from_pretrained(str(path), device="cpu", progress=False, dense_dtype="int4")


def _decode_logits(eng: Engine, prompt: list[int], steps: int, forced: list[int] | None = None
                   ) -> tuple[list[int], torch.Tensor]:
    """Greedy decode through the model with a KV cache (prefill, then one token per forward).

    With ``forced``, those tokens are fed instead of the argmax (teacher forcing). Returns the
    tokens fed and the logits [steps, V] each step saw.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=eng.model.config)
    ids = torch.tensor([prompt])
    tokens, rows = [], []
    with torch.no_grad():
        for i in range(steps):
            logits = eng.model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].float()  # [V]
            rows.append(logits)
            tok = forced[i] if forced is not None else int(logits.argmax())
            tokens.append(tok)
            ids = torch.tensor([[tok]])
    return tokens, torch.stack(rows)


def _native_and_reference(tiny_model_dir, monkeypatch, arch: str, dtype: str, steps: int = 12):
    """Decode with the native kernels, then teacher-force the reference path on the same tokens.

    The reference path is the engine without native kernels (``MOEPAGER_NATIVE=0``): experts one at
    a time through the module's own torch FFN and every dense layer on ``nn.Linear``, which is
    transformers' own arithmetic. Both decode the same way (prefill, then one token per forward).
    """
    path = tiny_model_dir(arch)
    prompt = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    with Engine.from_pretrained(str(path), device="cpu", dtype=dtype, progress=False) as eng:
        kernels = eng.kernels()
        if not kernels["moe_ffn"].startswith("native"):
            pytest.skip(f"native CPU kernels unavailable here: {kernels['moe_ffn']}")
        assert kernels["expert_compute"] == "PagedMoeCompute" and kernels["dense_native_layers"] > 0
        assert (kernels["norm_native_layers"] > 0) == (arch != "phimoe")  # PhiMoE: LayerNorm
        tokens, native = _decode_logits(eng, prompt, steps)
    with monkeypatch.context() as m:
        m.setattr("cuda_ext.native_cpu.available", lambda: False)
        m.setattr("cuda_ext.native_cpu.build", lambda progress=None, verbose=False: False)
        with Engine.from_pretrained(str(path), device="cpu", dtype=dtype, progress=False) as eng:
            ref = eng.kernels()
            assert ref["expert_compute"] == "TorchExpertCompute" and ref["dense_native_layers"] == 0
            assert ref["norm_native_layers"] == 0
            _, reference = _decode_logits(eng, prompt, steps, forced=tokens)
    return tokens, native, reference


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_native_float32_decode_equals_reference_path(tiny_model_dir, monkeypatch, arch):
    """float32: every decode step's logits equal the reference path's (atol 1e-4, as the parity tests)."""
    _, native, reference = _native_and_reference(tiny_model_dir, monkeypatch, arch, "float32")
    torch.testing.assert_close(native, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_native_bf16_greedy_equals_reference_path(tiny_model_dir, monkeypatch, arch):
    """bf16 pages: the native greedy tokens are the reference path's greedy choices.

    Teacher-forced on the native tokens, the reference must pick the same token at 9 of 12 steps or
    more. The slack is for bf16 near-ties in the routers: the kernels
    round activations at other points than torch, and when two router logits are within a bf16
    rounding of each other the two paths run different experts for that token, which moves its
    logits by far more than a rounding (float32 shows no such step: the test above).
    """
    steps = 12
    tokens, _, reference = _native_and_reference(tiny_model_dir, monkeypatch, arch, "bfloat16", steps)
    best = reference.max(dim=-1).values  # [steps]
    chosen = reference.gather(1, torch.tensor(tokens)[:, None])[:, 0]  # [steps]
    margin = best - chosen
    assert (margin == 0).sum().item() >= steps - 3, (tokens, reference.argmax(-1).tolist())


def test_page_cache_is_reused_and_rebuilt_when_corrupt_or_stale(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from engine.store import HostExpertStore

    path = _one_moe_layer_model(tiny_model_dir, "olmoe")
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    first = _logits(path, ids, tmp_path, expert_dtype="int8")
    files = list(tmp_path.glob("*.pages"))
    assert len(files) == 1 and str(path) not in str(files[0])  # in the cache directory, not the model folder

    # Second start: read back, never re-quantized.
    quantize = HostExpertStore._load_from_checkpoint
    calls = []
    monkeypatch.setattr(HostExpertStore, "_load_from_checkpoint",
                        lambda self, *a, **k: calls.append(1) or quantize(self, *a, **k))
    assert torch.equal(_logits(path, ids, tmp_path, expert_dtype="int8"), first)
    assert calls == []

    # A flipped byte in the pages: reported in one line, rebuilt, same logits.
    data = bytearray(files[0].read_bytes())
    data[-100] ^= 0xFF
    files[0].write_bytes(bytes(data))
    capsys.readouterr()
    assert torch.equal(_logits(path, ids, tmp_path, expert_dtype="int8"), first)
    err = capsys.readouterr().err
    assert "corrupt" in err and len(calls) == 1

    # A truncated file, then a header from other options (stale): rebuilt, never trusted.
    files[0].write_bytes(files[0].read_bytes()[:5000])
    assert torch.equal(_logits(path, ids, tmp_path, expert_dtype="int8"), first)
    assert "corrupt" in capsys.readouterr().err and len(calls) == 2
    head = files[0].read_bytes()
    key = files[0].stem
    files[0].write_bytes(head.replace(key.encode(), b"0" * len(key), 1))
    assert torch.equal(_logits(path, ids, tmp_path, expert_dtype="int8"), first)
    assert "does not match" in capsys.readouterr().err and len(calls) == 3

    # int4 is another file (another key), next to the int8 one.
    _logits(path, ids, tmp_path, expert_dtype="int4")
    assert len(list(tmp_path.glob("*.pages"))) == 2


def test_bad_expert_dtype_and_group_size(tiny_model_dir, tmp_path):
    path = _one_moe_layer_model(tiny_model_dir, "mixtral")  # hidden 64, expert intermediate 32
    with pytest.raises(MoepagerError, match="--expert-dtype: unknown page dtype 'int3'"):
        Engine.from_pretrained(str(path), device="cpu", progress=False, expert_dtype="int3")
    with pytest.raises(MoepagerError, match="--int4-group-size: group_size 48"):
        Engine.from_pretrained(str(path), device="cpu", progress=False, expert_dtype="int4", int4_group_size=48,
                               quant_cache_dir=str(tmp_path))
    with pytest.raises(MoepagerError, match="--int4-group-size must be a positive integer"):
        Engine.from_pretrained(str(path), device="cpu", progress=False, expert_dtype="int4", int4_group_size=0)


def test_zero_copy_keeps_rss_and_counters(tiny_model_dir):
    """On the CPU a slot is the host page: no slot memory, and the cache still counts hits and misses."""
    path = tiny_model_dir("olmoe")
    with Engine.from_pretrained(str(path), device="cpu", progress=False, expert_slots=6) as eng:
        assert eng.runtime.slots.numel() == 0
        from engine.generation import SamplingParams

        prompt = torch.randint(3, 128, (8,), generator=torch.Generator().manual_seed(4)).tolist()
        for _ in eng.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)):
            pass
        stats = eng.stats()
        assert stats["queries"] > stats["hits"] > 0 and stats["misses"] > 0


def _perplexity(eng: Engine, text: str, window: int = 256) -> float:
    ids = eng.tokenizer(text)["input_ids"][: 4 * window]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window + 1]])
        if chunk.shape[1] < 2:
            break
        logits = eng.logits(chunk[:, :-1])[0]
        nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


@pytest.mark.slow
def test_embedded_model_perplexity_per_page_dtype(tmp_path):
    text = (Path(__file__).parents[1] / "data" / "heldout.txt").read_text()
    ppl = {}
    for name, dt, dense in (("auto", "auto", "auto"), ("int8", "int8", "auto"), ("int4", "int4", "auto"),
                            ("int8+dense", "int8", "int8")):
        with Engine.from_pretrained(None, device="cpu", progress=False, expert_dtype=dt, dense_dtype=dense,
                                    quant_cache_dir=str(tmp_path)) as eng:
            ppl[name] = _perplexity(eng, text)
    assert ppl["auto"] < 400  # the model is trained: far below the unigram perplexity (~1000)
    assert abs(ppl["int8"] / ppl["auto"] - 1) < 0.01, ppl
    assert abs(ppl["int4"] / ppl["auto"] - 1) < 0.05, ppl
    assert abs(ppl["int8+dense"] / ppl["auto"] - 1) < 0.01, ppl
    assert ppl["int8"] != ppl["auto"] and ppl["int8+dense"] != ppl["int8"]  # really quantized


@pytest.mark.parametrize("expert_dtype", ["auto", "int8", "int4"])
def test_bytes_saved_are_counted(tiny_model_dir, tmp_path, expert_dtype):
    """Quantized pages count the bytes they save: per copy over the (emulated) link and per page read."""
    from cuda_ext.pages import PageFormat

    path = _one_moe_layer_model(tiny_model_dir, "olmoe")
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    with Engine.from_pretrained(str(path), device="cpu", progress=False, quant_cache_dir=str(tmp_path),
                                expert_dtype=expert_dtype, expert_slots=4, emulate_link_gbps=50.0) as eng:
        eng.logits(ids)
        stats, c = eng.stats(), eng.counters
        fmt = eng.store.fmt
        plain = PageFormat("float", eng.store.dtype, fmt.hidden, fmt.intermediate, fmt.transposed,
                           fmt.interleaved, fmt.has_bias).page_bytes
    per = plain - fmt.page_bytes
    assert (per == 0) == (expert_dtype == "auto") and per >= 0
    assert c.demand_copies > 0 and stats["queries"] > 0
    assert stats["bytes_saved"] == {"demand": c.demand_copies * per, "prefetch": c.prefetch_copies * per,
                                    "compute": stats["queries"] * per}
