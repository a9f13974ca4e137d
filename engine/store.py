"""Host expert store: every routed expert in one contiguous page of host memory.

One page per (MoE layer, expert), holding that expert's tensors (gate_up, down,
then biases when the architecture has them) in a ``cuda_ext.PageFormat``: float in
the compute dtype, or int8 / int4 quantized once at load (``--expert-dtype``) and
kept in an on-disk page cache so later starts read them directly. One copy moves
an expert (over PCIe a quantized page moves 2x / 4x fewer bytes), and the CPU
kernels compute straight from the page. All pages are rows of one uint8
allocation, pinned when CUDA is present, so transfers are true DMA.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cuda_ext.pages import PageFormat, advise_huge_pages
from engine import page_cache
from engine.arch import ExpertLayout, ExpertTensorRef, dequantize_mxfp4, down_to_layout, fuse_gate_up
from engine.config import EXPERT_DTYPES
from engine.errors import ModelLoadError, MoepagerError
from engine.safetensors_io import CheckpointReader

_FLOAT_BY_NAME = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


INT4_GROUP_SIZES = (128, 64, 32)  # preferred first: fewer scales per weight


def page_format(layout: ExpertLayout, compute_dtype: torch.dtype, expert_dtype: str = "auto",
                group_size: int | None = None) -> PageFormat:
    """The page format for ``--expert-dtype``: 'auto' stores experts in the compute dtype.

    int4 without a group size takes the largest of 128, 64, 32 that divides both the hidden and
    the expert intermediate size.
    """
    if expert_dtype not in EXPERT_DTYPES:
        raise MoepagerError(f"--expert-dtype: unknown page dtype {expert_dtype!r}; choose one of "
                            f"{', '.join(EXPERT_DTYPES)}")
    common = {"hidden": layout.hidden, "intermediate": layout.intermediate, "transposed": layout.is_transposed,
              "interleaved": not layout.is_concatenated, "has_bias": layout.has_bias}
    if expert_dtype == "int4" and group_size is None:
        group_size = next((g for g in INT4_GROUP_SIZES if layout.hidden % g == 0 and layout.intermediate % g == 0),
                          None)
        if group_size is None:
            raise MoepagerError(f"--expert-dtype int4: no group size of {', '.join(map(str, INT4_GROUP_SIZES))} "
                                f"divides hidden {layout.hidden} and expert intermediate {layout.intermediate}; "
                                "use int8")
    if expert_dtype in ("int8", "int4"):
        try:
            return PageFormat(expert_dtype, compute_dtype, group_size=group_size if expert_dtype == "int4" else 0,
                              **common)
        except ValueError as exc:
            raise MoepagerError(f"--int4-group-size: {exc}") from None
    return PageFormat("float", _FLOAT_BY_NAME.get(expert_dtype, compute_dtype), **common)


class HostExpertStore:
    """All expert pages: ``pages`` is uint8 ``[layers * experts, page_bytes]``, one row per expert."""

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int, fmt: PageFormat,
                 compute_dtype: torch.dtype, pin: bool) -> None:
        self.layout = layout
        self.fmt = fmt
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.dtype = compute_dtype  # what the experts compute in (activations, dequantized weights)
        self.page_bytes = fmt.page_bytes
        self.pages = torch.empty((num_layers * num_experts, self.page_bytes), dtype=torch.uint8, pin_memory=pin)
        self.pinned = pin
        if not pin:
            advise_huge_pages(self.pages)

    def page(self, layer: int, expert: int) -> torch.Tensor:
        return self.pages[layer * self.num_experts + expert]

    def weights(self, page: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                   torch.Tensor | None]:
        """One page (host or slot) -> (gate_up, down, gate_up_bias, down_bias) in the module layout and dtype."""
        return self.fmt.unpack(page, self.dtype)

    def float_views(self, pages: torch.Tensor) -> tuple | None:
        """Batched module-layout views [N, ...] of float pages in the compute dtype; None when a page needs
        dequantizing (quantized, or stored in another float dtype)."""
        fmt = self.fmt
        if fmt.kind != "float" or fmt.dtype != self.dtype:
            return None
        H, I = fmt.hidden, fmt.intermediate
        sec = fmt.sections()

        def view(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            off, n = sec[name]
            return pages[:, off : off + n].view(self.dtype).unflatten(-1, shape)

        w1, w2 = view("w1", (2 * I, H)), view("w2", (H, I))  # [N, 2I, H], [N, H, I]
        if fmt.transposed:
            w1, w2 = w1.transpose(-1, -2), w2.transpose(-1, -2)
        b1 = view("b1", (2 * I,)) if fmt.has_bias else None
        b2 = view("b2", (H,)) if fmt.has_bias else None
        return w1, w2, b1, b2

    @property
    def total_bytes(self) -> int:
        return self.pages.numel()

    def page_bytes_saved(self) -> int:
        """Bytes one page saves against a float page in the compute dtype (0 for float pages)."""
        plain = dataclasses.replace(self.fmt, kind="float", dtype=self.dtype, group_size=0)
        return max(plain.page_bytes - self.page_bytes, 0)

    # -- loading ---------------------------------------------------------------------
    def load(self, reader: CheckpointReader, refs: dict[int, list[ExpertTensorRef]], layer_order: list[int],
             progress: Callable[[int, int, int], None] | None = None, cache_dir: Path | None = None) -> None:
        """Fill every page from the checkpoint. ``refs`` maps decoder layer -> its expert tensors.

        Quantized pages are written to (and on later starts read from) the page cache in
        ``cache_dir`` when one is given.
        """
        path = key = None
        if cache_dir is not None and self.fmt.kind != "float":
            fields = {f: getattr(self.fmt, f) for f in ("kind", "dtype", "hidden", "intermediate", "transposed",
                                                       "interleaved", "has_bias", "group_size")}
            fields["layers"] = ",".join(map(str, layer_order))
            key = page_cache.cache_key(reader.files, fields, self.num_layers, self.num_experts)
            path = cache_dir / f"{key}.pages"
            if page_cache.read_pages(path, key, self.pages, self.num_layers):
                if progress:
                    progress(self.pages.shape[0], self.pages.shape[0], self.total_bytes)
                return
            print(f"moepager: quantizing experts to {self.fmt.kind} once (cached in {path})", file=sys.stderr,
                  flush=True)
        self._load_from_checkpoint(reader, refs, layer_order, progress)
        if path is not None:
            page_cache.write_pages(path, key, self.pages, self.num_layers)

    def _load_from_checkpoint(self, reader, refs, layer_order, progress) -> None:
        total_experts = self.num_layers * self.num_experts
        done_experts = 0
        done_bytes = 0
        for moe_idx, layer in enumerate(layer_order):
            layer_refs = refs.get(layer, [])
            fused = {r.role: r for r in layer_refs if r.expert is None}
            per_expert: dict[int, dict[str, ExpertTensorRef]] = {}
            for r in layer_refs:
                if r.expert is not None:
                    per_expert.setdefault(r.expert, {})[r.role] = r
            if fused:
                done_bytes += self._load_fused(reader, moe_idx, layer, fused)
                done_experts += self.num_experts
                if progress:
                    progress(done_experts, total_experts, done_bytes)
                continue
            for e in range(self.num_experts):
                parts = per_expert.get(e, {})
                missing = [role for role in ("gate", "up", "down") if role not in parts]
                if missing:
                    raise ModelLoadError(
                        f"checkpoint lacks expert {e} of layer {layer} ({', '.join(missing)} projection)")
                done_bytes += self._load_expert(reader, moe_idx, e, parts)
                done_experts += 1
                if progress and (e == self.num_experts - 1 or done_experts % 64 == 0):
                    progress(done_experts, total_experts, done_bytes)

    def _pack(self, moe_idx: int, expert: int, gate_up: torch.Tensor, down: torch.Tensor,
              gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> None:
        # Quantization reads fp32; float pages take the tensors as they are (no widening copy).
        cast = torch.float32 if self.fmt.kind != "float" else self.fmt.dtype
        self.fmt.pack(gate_up.to(cast), down.to(cast),
                      None if gate_up_bias is None else gate_up_bias.to(cast),
                      None if down_bias is None else down_bias.to(cast), out=self.page(moe_idx, expert))

    def _load_expert(self, reader: CheckpointReader, moe_idx: int, expert: int,
                     parts: dict[str, ExpertTensorRef]) -> int:
        lay = self.layout
        gate = reader.read(parts["gate"].name)  # [I, H]
        up = reader.read(parts["up"].name)  # [I, H]
        down = reader.read(parts["down"].name)  # [H, I]
        if gate.shape != (lay.intermediate, lay.hidden) or down.shape != (lay.hidden, lay.intermediate):
            raise ModelLoadError(
                f"expert {expert} of MoE layer {moe_idx}: shapes {tuple(gate.shape)}/{tuple(down.shape)} do not "
                f"match the config (intermediate {lay.intermediate}, hidden {lay.hidden})")
        self._pack(moe_idx, expert, fuse_gate_up(gate, up, lay), down_to_layout(down, lay))
        return sum(reader.entries[r.name].nbytes for r in parts.values())

    def _load_fused(self, reader: CheckpointReader, moe_idx: int, layer: int,
                    fused: dict[str, ExpertTensorRef]) -> int:
        nbytes = 0
        full: dict[str, torch.Tensor] = {}  # part name -> [E, ...]
        for name, shape in self.layout.parts():
            ref = fused.get(name)
            if ref is None and f"{name}_blocks" in fused and f"{name}_scales" in fused:
                full[name], n = self._read_mxfp4(reader, name, shape, fused[f"{name}_blocks"],
                                                 fused[f"{name}_scales"])
                nbytes += n
                continue
            if ref is None:
                raise ModelLoadError(f"checkpoint lacks experts.{name} of layer {layer}")
            want = (self.num_experts, *shape)
            if tuple(reader.shape(ref.name)) != want:
                raise ModelLoadError(f"{ref.name}: shape {reader.shape(ref.name)} does not match {want}")
            full[name] = reader.read(ref.name)
            nbytes += reader.entries[ref.name].nbytes
        bias = self.layout.has_bias
        for e in range(self.num_experts):
            self._pack(moe_idx, e, full["gate_up_proj"][e], full["down_proj"][e],
                       full["gate_up_proj_bias"][e] if bias else None, full["down_proj_bias"][e] if bias else None)
        return nbytes

    def _read_mxfp4(self, reader: CheckpointReader, name: str, shape: tuple[int, ...], blocks_ref: ExpertTensorRef,
                    scales_ref: ExpertTensorRef) -> tuple[torch.Tensor, int]:
        blocks = reader.read(blocks_ref.name)  # [E, R, G, 16] uint8
        scales = reader.read(scales_ref.name)  # [E, R, G] uint8
        if blocks.shape[0] != self.num_experts or blocks.shape[:-1] != scales.shape:
            raise ModelLoadError(f"{blocks_ref.name}: MXFP4 blocks {tuple(blocks.shape)} and scales "
                                 f"{tuple(scales.shape)} do not fit {self.num_experts} experts")
        out = torch.empty((self.num_experts, *shape), dtype=self.dtype)
        for e in range(self.num_experts):
            dense = dequantize_mxfp4(blocks[e], scales[e], self.dtype)  # [G*32, R]
            if tuple(dense.shape) != tuple(shape):
                raise ModelLoadError(f"{blocks_ref.name}: dequantizes to {tuple(dense.shape)}, expected {shape}")
            out[e] = dense
        return out, reader.entries[blocks_ref.name].nbytes + reader.entries[scales_ref.name].nbytes


def print_progress(prefix: str = "loading experts") -> Callable[[int, int, int], None]:
    """A progress callback printing experts and bytes to stderr (one line, rewritten on a terminal)."""
    start = time.perf_counter()
    tty = sys.stderr.isatty()
    last = [0.0]

    def report(done: int, total: int, nbytes: int) -> None:
        now = time.perf_counter()
        if done < total and now - last[0] < 0.5:
            return
        last[0] = now
        rate = nbytes / max(now - start, 1e-9) / 1e6
        line = f"{prefix}: {done}/{total} experts, {nbytes / 1e6:.1f} MB read ({rate:.0f} MB/s)"
        if tty:
            print("\r" + line, end="\n" if done >= total else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    return report
