"""Host expert store: every routed expert in one contiguous page of host memory.

One page per (MoE layer, expert), holding that expert's tensors in the fused
module's own layout (gate_up, down, then biases when the architecture has them),
so a single copy moves an expert and the device side can view a slot as the
same tensors. All pages are rows of one allocation, pinned when CUDA is present,
so transfers are true DMA.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from engine.arch import ExpertLayout, ExpertTensorRef, dequantize_mxfp4, down_to_layout, fuse_gate_up
from engine.errors import ModelLoadError
from engine.safetensors_io import CheckpointReader

PAGE_ALIGN_ELEMS = 64  # keep every page (and so every slot) 128-byte aligned for any dtype


class HostExpertStore:
    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int, dtype: torch.dtype,
                 pin: bool) -> None:
        self.layout = layout
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.dtype = dtype
        self.offsets: list[tuple[str, int, tuple[int, ...]]] = []  # (name, start element, shape)
        off = 0
        for name, shape in layout.parts():
            numel = 1
            for d in shape:
                numel *= d
            self.offsets.append((name, off, shape))
            off += numel
        self.used_elems = off
        self.page_elems = -(-off // PAGE_ALIGN_ELEMS) * PAGE_ALIGN_ELEMS
        self.page_bytes = self.page_elems * torch.empty((), dtype=dtype).element_size()
        self.pages = torch.empty((num_layers * num_experts, self.page_elems), dtype=dtype, pin_memory=pin)
        self.pinned = pin

    def page(self, layer: int, expert: int) -> torch.Tensor:
        return self.pages[layer * self.num_experts + expert]

    def part(self, page: torch.Tensor, name: str) -> torch.Tensor:
        for part_name, start, shape in self.offsets:
            if part_name == name:
                numel = 1
                for d in shape:
                    numel *= d
                return page[..., start : start + numel].unflatten(-1, shape)
        raise KeyError(name)

    @property
    def total_bytes(self) -> int:
        return self.pages.numel() * self.pages.element_size()

    # -- loading ---------------------------------------------------------------------
    def load(self, reader: CheckpointReader, refs: dict[int, list[ExpertTensorRef]], layer_order: list[int],
             progress: Callable[[int, int, int], None] | None = None) -> None:
        """Fill every page from the checkpoint. ``refs`` maps decoder layer -> its expert tensors."""
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

    def _load_expert(self, reader: CheckpointReader, moe_idx: int, expert: int,
                     parts: dict[str, ExpertTensorRef]) -> int:
        lay = self.layout
        gate = reader.read(parts["gate"].name).to(self.dtype)  # [I, H]
        up = reader.read(parts["up"].name).to(self.dtype)  # [I, H]
        down = reader.read(parts["down"].name).to(self.dtype)  # [H, I]
        page = self.page(moe_idx, expert)
        if gate.shape != (lay.intermediate, lay.hidden) or down.shape != (lay.hidden, lay.intermediate):
            raise ModelLoadError(
                f"expert {expert} of MoE layer {moe_idx}: shapes {tuple(gate.shape)}/{tuple(down.shape)} do not "
                f"match the config (intermediate {lay.intermediate}, hidden {lay.hidden})")
        self.part(page, "gate_up_proj").copy_(fuse_gate_up(gate, up, lay))
        self.part(page, "down_proj").copy_(down_to_layout(down, lay))
        return sum(reader.entries[r.name].nbytes for r in parts.values())

    def _load_fused(self, reader: CheckpointReader, moe_idx: int, layer: int,
                    fused: dict[str, ExpertTensorRef]) -> int:
        nbytes = 0
        for name, _start, shape in self.offsets:
            ref = fused.get(name)
            if ref is None and f"{name}_blocks" in fused and f"{name}_scales" in fused:
                nbytes += self._load_mxfp4(reader, moe_idx, name, shape, fused[f"{name}_blocks"],
                                           fused[f"{name}_scales"])
                continue
            if ref is None:
                raise ModelLoadError(f"checkpoint lacks experts.{name} of layer {layer}")
            want = (self.num_experts, *shape)
            if tuple(reader.shape(ref.name)) != want:
                raise ModelLoadError(f"{ref.name}: shape {reader.shape(ref.name)} does not match {want}")
            # One expert at a time keeps the staging buffer small.
            full = reader.read(ref.name)
            for e in range(self.num_experts):
                self.part(self.page(moe_idx, e), name).copy_(full[e])
            del full
            nbytes += reader.entries[ref.name].nbytes
        return nbytes


    def _load_mxfp4(self, reader: CheckpointReader, moe_idx: int, name: str, shape: tuple[int, ...],
                    blocks_ref: ExpertTensorRef, scales_ref: ExpertTensorRef) -> int:
        blocks = reader.read(blocks_ref.name)  # [E, R, G, 16] uint8
        scales = reader.read(scales_ref.name)  # [E, R, G] uint8
        if blocks.shape[0] != self.num_experts or blocks.shape[:-1] != scales.shape:
            raise ModelLoadError(f"{blocks_ref.name}: MXFP4 blocks {tuple(blocks.shape)} and scales "
                                 f"{tuple(scales.shape)} do not fit {self.num_experts} experts")
        for e in range(self.num_experts):
            dense = dequantize_mxfp4(blocks[e], scales[e], self.dtype)  # [G*32, R]
            if tuple(dense.shape) != tuple(shape):
                raise ModelLoadError(f"{blocks_ref.name}: dequantizes to {tuple(dense.shape)}, expected {shape}")
            self.part(self.page(moe_idx, e), name).copy_(dense)
        return reader.entries[blocks_ref.name].nbytes + reader.entries[scales_ref.name].nbytes


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
