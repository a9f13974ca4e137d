"""Sibling linears grouped into one native call (``cuda_ext.linear_group``): bit-identical outputs,
an unchanged state_dict, one shared storage, and the group dissolving whenever its members do not
read the very same input or a member's weight is replaced."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cuda_ext import Int8Linear, NativeLinear, native_cpu
from cuda_ext import linear_group as lg
from cuda_ext.linear_group import MAX_ROWS, LinearGroup, group_sibling_linears
from engine.dense import use_int8_dense, use_native_dense

H = 48  # input width; the members' row counts differ, as GQA's q and k/v do
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LEADS = [(1,), (1, 1), (5,), (1, 5)]  # leading dims of x: 1 row and 5 rows, 2-D and [B, T, H]


@pytest.fixture(scope="module")
def native():
    """The grouped call is bit-identical to lone calls only on the native kernels (one dot product per
    output row); torch's GEMM may block a wider weight differently."""
    if not native_cpu.available():
        pytest.skip(f"native CPU kernels unavailable: {native_cpu.status()[:200]}")


class Attn(nn.Module):
    def __init__(self, bias: bool, dtype: torch.dtype, hidden: int = H) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, 40, bias=bias, dtype=dtype)
        self.k_proj = nn.Linear(hidden, 24, bias=bias, dtype=dtype)
        self.v_proj = nn.Linear(hidden, 24, bias=bias, dtype=dtype)
        self.o_proj = nn.Linear(40, hidden, bias=bias, dtype=dtype)  # reads another input: never grouped

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class Mlp(nn.Module):
    def __init__(self, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(H, 32, bias=bias, dtype=dtype)
        self.up_proj = nn.Linear(H, 32, bias=bias, dtype=dtype)
        self.down_proj = nn.Linear(32, H, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = Attn(bias, dtype)
        self.mlp = Mlp(bias, dtype)

    def forward(self, x):
        return (*self.self_attn(x), self.mlp(x))


def _model(bias: bool = True, dtype: torch.dtype = torch.float32, int8: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.ModuleList([Block(bias, dtype), Block(bias, dtype)]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    if int8:
        assert use_int8_dense(model) == 14  # every linear has at least INT8_MIN_ROWS rows
    assert use_native_dense(model) == (0 if int8 else 14)
    return model


def _x(lead, dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, H, generator=g).to(dtype)


def _run(model, x):
    return [y for block in model for y in block(x)]


def _groups(model) -> list[LinearGroup]:
    return list({id(m.group): m.group for m in model.modules() if getattr(m, "group", None) is not None}.values())


def _assert_same(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert a.is_contiguous(), i  # as a lone linear's output, whatever the model does with it next
        assert torch.equal(a, b), (i, (a.float() - b.float()).abs().max().item())


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the grouped kernel calls (``linear`` / ``linear_int8`` as linear_group calls them)."""
    calls = []

    def counting(fn):
        def wrapper(*args, **kw):
            calls.append(args[1].shape[0])
            return fn(*args, **kw)
        return wrapper

    monkeypatch.setattr(lg, "linear", counting(lg.linear))
    monkeypatch.setattr(lg, "linear_int8", counting(lg.linear_int8))
    return calls


def _check_grouped_model(model, ref, dtype, fused_calls):
    assert group_sibling_linears(model) == 4  # q/k/v and gate/up of each block; o_proj and down_proj stay alone
    groups = _groups(model)
    assert len(groups) == 4
    for lead in LEADS:
        for seed in (1, 2):  # a second input: a finished round leaves nothing pending
            x = _x(lead, dtype, seed)
            fused_calls.clear()
            with torch.no_grad():
                got, want = _run(model, x), _run(ref, x)
            _assert_same(got, want)
            assert len(fused_calls) == 4, "every group computes all its members in one call"
            assert all(g.active for g in groups)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_native_linears_grouped_are_bit_identical_and_share_one_storage(native, dtype, bias, fused_calls):
    model = _model(bias, dtype)
    ref = copy.deepcopy(model)
    want_sd = ref.state_dict()
    params = {name: p for name, p in model.named_parameters()}
    _check_grouped_model(model, ref, dtype, fused_calls)

    got_sd = model.state_dict()
    assert list(got_sd) == list(want_sd)
    for k in want_sd:
        assert got_sd[k].dtype == want_sd[k].dtype and torch.equal(got_sd[k], want_sd[k]), k
    assert {name: p for name, p in model.named_parameters()} == params  # the very same Parameter objects

    for block in model:
        for members in ([block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj],
                        [block.mlp.gate_proj, block.mlp.up_proj]):
            for name in ["weight", "bias"] if bias else ["weight"]:
                tensors = [getattr(m, name) for m in members]
                storage = tensors[0].untyped_storage()
                assert all(t.untyped_storage().data_ptr() == storage.data_ptr() for t in tensors), name
                assert storage.nbytes() == sum(t.numel() * t.element_size() for t in tensors), name
                assert all(t.is_contiguous() for t in tensors)
        assert block.self_attn.o_proj.group is None and block.mlp.down_proj.group is None


def test_int8_linears_grouped_are_bit_identical(native, fused_calls):
    model = _model(True, torch.bfloat16, int8=True)
    assert not any(isinstance(m, (nn.Linear, NativeLinear)) for m in model.modules())
    ref = copy.deepcopy(model)
    want_sd = ref.state_dict()
    _check_grouped_model(model, ref, torch.bfloat16, fused_calls)
    got_sd = model.state_dict()
    assert list(got_sd) == list(want_sd)
    assert all(torch.equal(got_sd[k], want_sd[k]) and got_sd[k].dtype == want_sd[k].dtype for k in want_sd)
    attn = model[0].self_attn
    for name in ("qweight", "scales", "bias"):
        tensors = [getattr(m, name) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        storage = tensors[0].untyped_storage()
        assert all(t.untyped_storage().data_ptr() == storage.data_ptr() for t in tensors), name
        assert storage.nbytes() == sum(t.numel() * t.element_size() for t in tensors), name


def _attn(int8: bool = False, dtype=torch.float32):
    torch.manual_seed(0)
    attn = Attn(True, dtype).eval()
    if int8:
        use_int8_dense(attn)
    use_native_dense(attn)
    ref = copy.deepcopy(attn)
    assert group_sibling_linears(attn) == 1
    return attn, ref, attn.q_proj.group


@pytest.mark.parametrize("int8", [False, True], ids=["native", "int8"])
def test_other_input_dissolves_the_group(native, int8):
    dtype = torch.bfloat16 if int8 else torch.float32
    x1, x2, x3 = _x((1, 1), dtype, 1), _x((1, 1), dtype, 2), _x((1, 3), dtype, 3)
    with torch.no_grad():
        # q alone, then q again on another input: k and v never took theirs
        attn, ref, group = _attn(int8, dtype)
        assert torch.equal(attn.q_proj(x1), ref.q_proj(x1)) and group.active
        assert torch.equal(attn.q_proj(x2), ref.q_proj(x2))
        assert not group.active
        _assert_same(attn(x2), ref(x2))
        _assert_same(attn(x3), ref(x3))
        assert not group.active  # for good

        # k on another tensor than q was called on: k must not take q's input's rows
        attn, ref, group = _attn(int8, dtype)
        assert torch.equal(attn.q_proj(x1), ref.q_proj(x1))
        assert torch.equal(attn.k_proj(x2), ref.k_proj(x2))
        assert not group.active
        assert torch.equal(attn.v_proj(x1), ref.v_proj(x1))

        # an equal copy is another tensor too
        attn, ref, group = _attn(int8, dtype)
        attn.q_proj(x1)
        assert torch.equal(attn.k_proj(x1.clone()), ref.k_proj(x1)) and not group.active

        # the same tensor, changed in place after q read it
        attn, ref, group = _attn(int8, dtype)
        x = x1.clone()
        assert torch.equal(attn.q_proj(x), ref.q_proj(x))
        x.mul_(-2)
        assert torch.equal(attn.k_proj(x), ref.k_proj(x))
        assert torch.equal(attn.v_proj(x), ref.v_proj(x))
        assert not group.active

        # members called out of order on one input keep the group
        attn, ref, group = _attn(int8, dtype)
        for x in (x1, x2, x3):
            got = [attn.v_proj(x), attn.q_proj(x), attn.k_proj(x)]
            _assert_same(got, [ref.v_proj(x), ref.q_proj(x), ref.k_proj(x)])
        assert group.active


@pytest.mark.parametrize("how", ["parameter", "data"])
def test_replaced_weight_dissolves_the_group(native, how):
    attn, ref, group = _attn()
    x = _x((1, 1), torch.float32)
    with torch.no_grad():
        _assert_same(attn(x), ref(x))
        new = torch.randn(24, H, generator=torch.Generator().manual_seed(7))
        if how == "parameter":
            attn.k_proj.weight = nn.Parameter(new.clone())
        else:
            attn.k_proj.weight.data = new.clone()
        ref.k_proj.weight = nn.Parameter(new.clone())
        for x in (_x((1, 1), torch.float32, 4), _x((5,), torch.float32, 5)):
            _assert_same(attn(x), ref(x))
    assert not group.active


def test_replaced_int8_buffer_dissolves_the_group(native):
    attn, ref, group = _attn(int8=True, dtype=torch.bfloat16)
    x = _x((1, 1), torch.bfloat16)
    with torch.no_grad():
        _assert_same(attn(x), ref(x))
        attn.v_proj.scales = attn.v_proj.scales * 2
        ref.v_proj.scales = ref.v_proj.scales * 2
        x = _x((1, 1), torch.bfloat16, 2)
        _assert_same(attn(x), ref(x))
    assert not group.active


def test_many_rows_compute_member_by_member(native, fused_calls):
    attn, ref, group = _attn()
    x = _x((1, MAX_ROWS + 1), torch.float32)
    with torch.no_grad():
        _assert_same(attn(x), ref(x))
        assert fused_calls == [] and group.active  # left alone, not dissolved
        x = _x((1, MAX_ROWS), torch.float32)
        _assert_same(attn(x), ref(x))
        assert fused_calls == [40 + 24 + 24] and group.active


def test_grad_enabled_computes_member_by_member(native, fused_calls):
    attn, ref, group = _attn()
    x = _x((1, 1), torch.float32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = attn(xa), ref(xb)
    _assert_same(got, want)
    assert fused_calls == [] and group.active
    assert all(y.requires_grad for y in got)
    sum(y.sum() for y in got).backward()
    sum(y.sum() for y in want).backward()
    assert torch.equal(xa.grad, xb.grad)
    for name in ("q_proj", "k_proj", "v_proj"):
        for p in ("weight", "bias"):
            g, w = getattr(getattr(attn, name), p).grad, getattr(getattr(ref, name), p).grad
            assert g is not None and torch.equal(g, w), (name, p)
    # grad enabled, an input that needs none: still computed alone (the weights need grads)
    with torch.enable_grad():
        _assert_same(attn(x), ref(x))
    assert fused_calls == [] and group.active


def test_unlike_siblings_are_not_grouped():
    def attn(**kw):
        torch.manual_seed(0)
        a = Attn(True, torch.bfloat16)
        use_native_dense(a)
        for name, mod in kw.items():
            setattr(a, name, mod)
        return a

    small = nn.Linear(H, 24, dtype=torch.bfloat16)
    cases = {
        "int8 among native": attn(k_proj=Int8Linear.from_linear(small)),
        "other in_features": attn(v_proj=NativeLinear.from_linear(nn.Linear(H + 8, 24, dtype=torch.bfloat16))),
        "other dtype": attn(v_proj=NativeLinear.from_linear(nn.Linear(H, 24))),
        "bias and none": attn(q_proj=NativeLinear.from_linear(nn.Linear(H, 40, bias=False, dtype=torch.bfloat16))),
        "plain nn.Linear": attn(k_proj=small),
        "a member that is no linear": attn(v_proj=nn.Identity()),
    }
    for name, a in cases.items():
        assert group_sibling_linears(a) == 0, name
        assert all(getattr(m, "group", None) is None for m in a.modules()), name
    missing = attn()
    del missing.v_proj  # q and k alone are no siblings
    assert group_sibling_linears(missing) == 0
    plain = Attn(True, torch.float32)
    assert group_sibling_linears(plain) == 0  # nn.Linear: nothing the native kernels serve
    a = attn()
    assert group_sibling_linears(a) == 1
    assert group_sibling_linears(a) == 0  # members already grouped


PROMPT = [5, 9, 17, 33]  # with 12 tokens: a logits pass of MAX_ROWS rows, grouped too


@pytest.mark.parametrize("dense_dtype", ["auto", "int8"])
def test_engine_groups_olmoe_and_decodes_the_same(tiny_model_dir, dense_dtype, fused_calls):
    from engine import Engine
    from engine.generation import SamplingParams

    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    path = tiny_model_dir("olmoe")
    with Engine.from_pretrained(path, device="cpu", progress=False, dtype="bfloat16", dense_dtype=dense_dtype) as eng:
        groups = _groups(eng.model)
        if not native_cpu.available():
            assert eng.kernels()["linear_groups"] == 0 and groups == []
            pytest.skip(f"native CPU kernels unavailable: {native_cpu.status()[:200]}")
        layers = eng.model.config.num_hidden_layers
        assert eng.kernels()["linear_groups"] == len(groups) == layers  # q/k/v; OLMoE's experts are no nn.Linear
        want_type = Int8Linear if dense_dtype == "int8" else NativeLinear
        assert all(type(m) is want_type for g in groups for m in g.members)

        def decode():
            tokens = [ev.token_id for ev in eng.generate([PROMPT], greedy) if ev.token_id is not None]
            return tokens, eng.logits(torch.tensor([PROMPT + tokens]))

        fused_calls.clear()
        tokens, logits = decode()
        assert len(tokens) == 12
        assert all(g.active for g in groups), "the model's calls dissolved a group"
        assert len(fused_calls) >= layers * 13  # prefill + 11 decode steps + the logits pass, per layer
        for g in groups:
            g.active = False
        fused_calls.clear()
        alone_tokens, alone_logits = decode()
        assert fused_calls == []
        assert alone_tokens == tokens
        assert torch.equal(alone_logits, logits)
