"""Expert page formats: one contiguous byte page per expert, float or quantized.

A page holds one routed expert (gate_up, down and, when the architecture has
them, both biases) so that one copy moves an expert. ``PageFormat.pack`` takes
the tensors in the fused experts module's own layout and writes a page;
``unpack`` turns a page (CPU or CUDA, pure torch) back into module-layout
tensors, dequantizing on the page's device.

Design: whatever the module layout, weights are stored as ``[out, in]`` rows
(gate_up as ``[2I, H]``, down as ``[H, I]``), the layout the CPU kernels read
fastest: one output element is one contiguous dot product. GPT-OSS modules
(``transposed``) are therefore stored transposed, and ``unpack`` returns
transposed views. The gate/up row order (``interleaved`` or gate rows first)
is kept as the module has it. Every section starts on a 64-byte boundary:

    float: w1 [2I, H] dtype | w2 [H, I] dtype | b1 [2I] | b2 [H]
    int8:  w1 [2I, H] int8  | w2 [H, I] int8  | s1 [2I] | s2 [H] | b1 | b2
    int4:  w1 [2I, H/2] u8  | w2 [H, I/2] u8  | s1 [2I, H/g] | s2 [H, I/g] | b1 | b2

int8 is symmetric per output row (q in [-127, 127]); int4 symmetric per group
of ``group_size`` inputs (q in [-7, 7], stored as q + 8). In each run of 32
inputs of an int4 row, byte i holds input i in its low nibble and input i + 16
in its high nibble. Scales and biases are stored in ``dtype``. The native
kernels (``csrc/cpu_ops.cpp``) compute the same offsets; keep both in step.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ALIGN = 64
KINDS = ("float", "int8", "int4")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT4_CHUNK = 32  # inputs per packed int4 run (16 bytes)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _round_scale_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` in ``dtype``, never below the fp32 value, so |w / s| never exceeds the code range."""
    s = scale.to(dtype)
    low = s.float() < scale
    if bool(low.any()):
        bits = s.view(torch.int32 if dtype == torch.float32 else torch.int16)
        bits[low] += 1  # positive floats: the next representable value up
    return s


@dataclass(frozen=True)
class PageFormat:
    """How one expert is laid out in a page; see the module docstring for the byte layout."""

    kind: str  # "float" (page stores weights in `dtype`) | "int8" | "int4"
    dtype: torch.dtype  # float kind: the page dtype; int kinds: dtype of scales and biases
    hidden: int  # H
    intermediate: int  # I
    transposed: bool  # module layout gate_up [H, 2I], down [I, H] (GPT-OSS) instead of [2I, H] / [H, I]
    interleaved: bool  # gate/up alternate along the 2I axis (GPT-OSS) instead of gate rows first
    has_bias: bool  # gate_up bias [2I] and down bias [H]
    group_size: int = 0  # int4 only: group along the input dim; must divide H and I

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {self.dtype}")
        if self.hidden <= 0 or self.intermediate <= 0:
            raise ValueError(f"hidden and intermediate must be positive, got {self.hidden}, {self.intermediate}")
        if self.kind == "int4":
            g = self.group_size
            if g <= 0 or g % INT4_CHUNK or self.hidden % g or self.intermediate % g:
                raise ValueError(f"group_size {g} must be a positive multiple of {INT4_CHUNK} that divides "
                                 f"hidden {self.hidden} and intermediate {self.intermediate}")
        elif self.group_size:
            raise ValueError(f"group_size applies to int4 pages only, got group_size {self.group_size} "
                             f"for kind {self.kind!r}")

    # -- layout ------------------------------------------------------------------------
    def sections(self) -> dict[str, tuple[int, int]]:
        """Name -> (byte offset, byte length) of each part of the page."""
        H, I = self.hidden, self.intermediate
        es = _elem(self.dtype)
        if self.kind == "float":
            parts = [("w1", 2 * I * H * es), ("w2", H * I * es)]
        elif self.kind == "int8":
            parts = [("w1", 2 * I * H), ("w2", H * I), ("s1", 2 * I * es), ("s2", H * es)]
        else:
            g = self.group_size
            parts = [("w1", I * H), ("w2", H * I // 2), ("s1", 2 * I * (H // g) * es),
                     ("s2", H * (I // g) * es)]
        if self.has_bias:
            parts += [("b1", 2 * I * es), ("b2", H * es)]
        out, off = {}, 0
        for name, n in parts:
            out[name] = (off, n)
            off = _align(off + n)
        return out

    @property
    def page_bytes(self) -> int:
        end = max(off + n for off, n in self.sections().values())
        return _align(end)

    def _view(self, page: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        off, n = self.sections()[name]
        return page[off : off + n].view(dtype).view(shape)

    # -- pack ----------------------------------------------------------------------------
    def pack(self, gate_up: torch.Tensor, down: torch.Tensor, gate_up_bias: torch.Tensor | None = None,
             down_bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Module-layout float tensors -> a uint8 page ``[page_bytes]`` (written into ``out`` if given)."""
        H, I = self.hidden, self.intermediate
        w1 = gate_up.t() if self.transposed else gate_up  # [2I, H]
        w2 = down.t() if self.transposed else down  # [H, I]
        if tuple(w1.shape) != (2 * I, H) or tuple(w2.shape) != (H, I):
            raise ValueError(f"gate_up {tuple(gate_up.shape)} / down {tuple(down.shape)} do not match "
                             f"hidden {H}, intermediate {I}, transposed {self.transposed}")
        if self.has_bias != (gate_up_bias is not None and down_bias is not None):
            raise ValueError(f"has_bias is {self.has_bias}: pass both biases exactly when it is True")
        if out is None:
            out = torch.zeros(self.page_bytes, dtype=torch.uint8, device=gate_up.device)
        elif out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < self.page_bytes or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous uint8 tensor of at least {self.page_bytes} bytes")
        dt = self.dtype
        if self.kind == "float":
            self._view(out, "w1", dt, (2 * I, H)).copy_(w1)
            self._view(out, "w2", dt, (H, I)).copy_(w2)
        elif self.kind == "int8":
            for w, wn, sn in ((w1, "w1", "s1"), (w2, "w2", "s2")):
                q, s = quantize_int8(w, dt)
                self._view(out, wn, torch.int8, tuple(w.shape)).copy_(q)
                self._view(out, sn, dt, (w.shape[0],)).copy_(s)
        else:
            g = self.group_size
            for w, wn, sn in ((w1, "w1", "s1"), (w2, "w2", "s2")):
                rows, k = w.shape
                q, s = quantize_int4(w, g, dt)
                self._view(out, wn, torch.uint8, (rows, k // 2)).copy_(pack_int4(q))
                self._view(out, sn, dt, (rows, k // g)).copy_(s)
        if self.has_bias:
            self._view(out, "b1", dt, (2 * I,)).copy_(gate_up_bias)
            self._view(out, "b2", dt, (H,)).copy_(down_bias)
        return out

    # -- unpack --------------------------------------------------------------------------
    def unpack(self, page: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """A page (CPU or CUDA) -> (gate_up, down, gate_up_bias, down_bias) in the module layout, in ``dtype``.

        Float pages in their own dtype come back as views of the page (transposed
        views for GPT-OSS); everything else is a new tensor on the page's device.
        """
        H, I = self.hidden, self.intermediate
        if self.kind == "float":
            w1 = self._view(page, "w1", self.dtype, (2 * I, H)).to(dtype)
            w2 = self._view(page, "w2", self.dtype, (H, I)).to(dtype)
        elif self.kind == "int8":
            w1 = self._dequant_int8(page, "w1", "s1", (2 * I, H), dtype)
            w2 = self._dequant_int8(page, "w2", "s2", (H, I), dtype)
        else:
            w1 = self._dequant_int4(page, "w1", "s1", (2 * I, H), dtype)
            w2 = self._dequant_int4(page, "w2", "s2", (H, I), dtype)
        b1 = b2 = None
        if self.has_bias:
            b1 = self._view(page, "b1", self.dtype, (2 * I,)).to(dtype)
            b2 = self._view(page, "b2", self.dtype, (H,)).to(dtype)
        if self.transposed:
            w1, w2 = w1.t(), w2.t()
        return w1, w2, b1, b2

    def _dequant_int8(self, page, wn, sn, shape, dtype):
        q = self._view(page, wn, torch.int8, shape)
        s = self._view(page, sn, self.dtype, (shape[0], 1))
        return (q.float() * s.float()).to(dtype)

    def _dequant_int4(self, page, wn, sn, shape, dtype):
        rows, k = shape
        g = self.group_size
        q = unpack_int4(self._view(page, wn, torch.uint8, (rows, k // 2)))  # [rows, k] int8
        s = self._view(page, sn, self.dtype, (rows, k // g, 1)).float()
        return (q.float().view(rows, k // g, g) * s).view(rows, k).to(dtype)

    # -- error bound ---------------------------------------------------------------------
    def error_bound(self, page: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-element bound on |w - unpack(pack(w))| for (gate_up, down), in the module layout.

        int8: |w - w'| <= scale / 2, with the scale of the element's output row
        (channel). int4: |w - w'| <= scale / 2, with the scale of the element's
        group of ``group_size`` inputs. Scales are rounded up when stored in
        ``dtype``, so codes never clip and the bound holds exactly (up to the
        fp32 rounding of q * scale). Float pages: zero beyond the rounding of
        the cast to ``dtype`` (half an ulp of ``dtype``), which is not counted here.
        """
        H, I = self.hidden, self.intermediate
        if self.kind == "float":
            b1, b2 = torch.zeros(2 * I, H, device=page.device), torch.zeros(H, I, device=page.device)
        elif self.kind == "int8":
            b1 = self._view(page, "s1", self.dtype, (2 * I, 1)).float().expand(2 * I, H) / 2
            b2 = self._view(page, "s2", self.dtype, (H, 1)).float().expand(H, I) / 2
        else:
            g = self.group_size
            b1 = self._view(page, "s1", self.dtype, (2 * I, H // g)).float().repeat_interleave(g, dim=1) / 2
            b2 = self._view(page, "s2", self.dtype, (H, I // g)).float().repeat_interleave(g, dim=1) / 2
        if self.transposed:
            b1, b2 = b1.t(), b2.t()
        return b1, b2


# -- quantizers (pure torch, any device) ----------------------------------------------------
def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w [rows, k] -> (q int8 [rows, k], scale [rows] in scale_dtype)."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    s = _round_scale_up((amax / 127).clamp_min(torch.finfo(scale_dtype).tiny), scale_dtype)
    q = torch.round(w / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


def quantize_int4(w: torch.Tensor, group: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-wise int4: w [rows, k] -> (q int8 in [-7, 7] [rows, k], scale [rows, k/group])."""
    rows, k = w.shape
    wg = w.float().reshape(rows, k // group, group)
    amax = wg.abs().amax(dim=2)
    s = _round_scale_up((amax / 7).clamp_min(torch.finfo(scale_dtype).tiny), scale_dtype)
    q = torch.round(wg / s.float()[..., None]).clamp_(-7, 7).to(torch.int8)
    return q.reshape(rows, k), s


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q int8 [rows, k] in [-8, 7] -> bytes [rows, k/2]: per run of 32, byte i = (q[i]+8) | (q[i+16]+8) << 4."""
    rows, k = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(rows, k // INT4_CHUNK, 2, INT4_CHUNK // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(rows, k // 2)


def unpack_int4(b: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: bytes [rows, k/2] -> q int8 [rows, k]."""
    rows, half = b.shape
    b = b.reshape(rows, half // (INT4_CHUNK // 2), 1, INT4_CHUNK // 2)
    u = torch.cat([b & 0x0F, b >> 4], dim=2)  # [rows, k/32, 2, 16]
    return (u.to(torch.int8) - 8).reshape(rows, 2 * half)


def apply_act(gu: torch.Tensor, interleaved: bool, act: str, alpha: float, limit: float) -> torch.Tensor:
    """gate_up output [n, 2I] -> [n, I]: "silu" (silu(gate) * up) or "swiglu_oai" (GPT-OSS's clamped SwiGLU)."""
    gate, up = (gu[..., ::2], gu[..., 1::2]) if interleaved else gu.chunk(2, dim=-1)
    if act == "silu":
        return F.silu(gate) * up
    if act == "swiglu_oai":
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
        return (up + 1) * gate * torch.sigmoid(gate * alpha)
    raise ValueError(f"act must be 'silu' or 'swiglu_oai', got {act!r}")


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back ``t`` (not yet written) with 2 MiB pages: the kernels stream every page of
    a layer per token, and 4 KiB pages would cost a TLB miss every 4 KiB. Best effort (False when
    the platform or the transparent-huge-page setting says no)."""
    if sys.platform != "linux" or t.numel() * t.element_size() < 2 * _HUGE:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        start = -(-t.data_ptr() // _HUGE) * _HUGE
        end = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE * _HUGE
        return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
