"""Sibling linears that read the same input, served by one native kernel call.

Attention's q, k and v projections (and an MLP's gate and up) read the same hidden
state. Called one by one at decode, each pays an op dispatch, a parallel region and a
cold start of its weight stream; one call over their concatenated rows reads the
same bytes once, as one stream.

Design: the members' weights (int8: and scales; and biases) are concatenated once, and
each member's tensors become views of its rows, so no byte is duplicated and
``state_dict`` is unchanged. The first member called on an input computes every
member's rows; the others, called on that very tensor (same object, same version),
take theirs. Each output row is the same dot product as a lone call computes, so the
results are bit-identical. Nothing is assumed about the model's code: a member called
on another input, or a weight that no longer lives in the concatenation, dissolves the
group for good and every member computes alone again.
"""

from __future__ import annotations

import torch
from torch import nn

from cuda_ext.cpu import Int8Linear, NativeLinear, linear, linear_int8

# Inputs of more rows than this compute member by member: the native kernels' small-T range ends
# there (csrc/cpu_ops.cpp kLinearMaxTokens), and beyond it a GEMM per member is what torch runs.
MAX_ROWS = 16

# Sibling names that read the same input in transformers' modules: attention (most models,
# DeepSeek's MLA with and without a q LoRA), and gated MLPs / shared experts.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("q_a_proj", "kv_a_proj_with_mqa"), ("q_proj", "kv_a_proj_with_mqa"),
            ("gate_proj", "up_proj"), ("w1", "w3"))


def _tensors(m: nn.Module) -> list[str]:
    """Names of the row-indexed tensors of a member: its weight (int8: and scales), and its bias."""
    names = ["qweight", "scales"] if isinstance(m, Int8Linear) else ["weight"]
    return names + (["bias"] if m.bias is not None else [])


def _repoint(m: nn.Module, name: str, view: torch.Tensor) -> None:
    t = getattr(m, name)
    if isinstance(t, nn.Parameter):
        t.data = view  # the same Parameter object: optimisers, tied names and state_dict keys are kept
    else:
        m._buffers[name] = view


class LinearGroup:
    """Members (all ``NativeLinear`` or all ``Int8Linear``, same input size, dtypes and bias presence)
    sharing one concatenated weight; see the module docstring."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self.int8 = isinstance(members[0], Int8Linear)
        self.names = _tensors(members[0])
        rows = [m.out_features for m in members]
        self.bounds = [(sum(rows[:i]), sum(rows[: i + 1])) for i in range(len(rows))]
        self.fused: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name in self.names:
                whole = torch.cat([getattr(m, name).detach() for m in members]).contiguous()
                self.fused[name] = whole
                for m, (a, b) in zip(members, self.bounds):
                    _repoint(m, name, whole[a:b])
        self._ptrs = [[getattr(m, n).data_ptr() for n in self.names] for m in members]
        self.active = True
        self._x: torch.Tensor | None = None
        self._version = -1
        self._outs: list[torch.Tensor] | None = None
        self._pending: set[int] = set()
        for i, m in enumerate(members):
            m.group, m.group_index = self, i

    def dissolve(self) -> None:
        """Every member computes alone from now on (its tensors stay views of the concatenation)."""
        self.active = False
        self._x = self._outs = None
        self._pending = set()

    def whole(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every member's rows for ``x`` from one call, ``[..., sum of rows]`` in member order; None
        when the group cannot serve ``x`` (dissolved, not on the CPU, too many rows, autograd)."""
        if not self.active or x.device.type != "cpu" or x.dim() == 0 or x.numel() > MAX_ROWS * x.shape[-1]:
            return None
        if torch.is_grad_enabled():
            return None
        if any(getattr(m, n).data_ptr() != p for m, ptrs in zip(self.members, self._ptrs)
               for n, p in zip(self.names, ptrs)):  # a member's weight was replaced: no longer ours
            self.dissolve()
            return None
        f = self.fused
        return (linear_int8(x, f["qweight"], f["scales"], f.get("bias")) if self.int8
                else linear(x, f["weight"], f.get("bias")))

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member ``i``'s output for ``x``, or None when it must compute alone."""
        if x is self._x and x._version == self._version and i in self._pending:
            self._pending.discard(i)
            y = self._outs[i]
            if not self._pending:
                self._x = self._outs = None
            return y
        if self._pending:  # a member was not called on the last input: they do not share inputs
            self.dissolve()
            return None
        y = self.whole(x)
        if y is None:
            return None
        many = x.numel() > x.shape[-1]  # a slice of more than one row is strided: hand out a copy
        outs = [y[..., a:b].contiguous() if many else y[..., a:b] for a, b in self.bounds]
        self._x, self._version, self._outs = x, x._version, outs
        self._pending = set(range(len(outs))) - {i}
        return outs[i]


def _groupable(members: list[nn.Module]) -> bool:
    first = members[0]
    if type(first) not in (NativeLinear, Int8Linear) or any(type(m) is not type(first) for m in members):
        return False
    if any(getattr(m, "group", None) is not None for m in members):
        return False
    names = _tensors(first)
    for m in members:
        if _tensors(m) != names or m.in_features != first.in_features:
            return False
        for n in names:
            t, t0 = getattr(m, n), getattr(first, n)
            if t.device.type != "cpu" or t.dtype != t0.dtype or not t.is_contiguous():
                return False
    return True


def group_sibling_linears(model: nn.Module) -> int:
    """Group each module's sibling linears (``SIBLINGS``) that the native kernels serve; returns how
    many groups were made."""
    groups = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SIBLINGS:
            if all(n in children for n in names):
                members = [children[n] for n in names]
                if _groupable(members):
                    LinearGroup(members)
                    groups += 1
    return groups


__all__ = ["MAX_ROWS", "SIBLINGS", "LinearGroup", "group_sibling_linears"]
