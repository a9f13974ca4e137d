"""A transformers KV cache seen as rows of left-padded sequences that can join and leave.

Design
- Every row of the cache has the same length L: shorter sequences are left-padded, and a
  2D attention mask ``[B, L]`` (1 real, 0 padding) travels with the cache. transformers builds
  the causal and sliding-window masks from cache indices plus this 2D mask, and RoPE from the
  explicit position_ids, so left padding is invisible to the math.
- Joining rows: each layer's key/value tensors are left-padded along the sequence dim (-2) to
  the longer side and concatenated along the batch dim (0). This is generic over what a layer
  stores (MLA latents, different key and value widths). A sliding-window layer keeps only its
  last ``window - 1`` positions; the side that keeps fewer kept its whole history, so left
  padding stays a prefix of padding and the window arithmetic holds.
- Leaving rows: select along the batch dim, then cut leading columns that are padding in every
  remaining row, so the cache does not keep the length of the longest sequence ever seen.
- Only layer types whose whole state is ``keys``/``values`` (+ ``cumulative_length``) are
  handled; ``is_mergeable`` says so, and the generation loop falls back to re-prefilling the
  batch for anything else rather than risk wrong output.
- Appending without copying the history: transformers' ``DynamicLayer`` concatenates every
  step, so each decode token copies (and allocates anew) the whole cache of every layer, which
  at a few thousand tokens of context costs more than the weights. ``GrowingLayer`` keeps
  ``keys``/``values`` as the first positions of buffers with room to grow and writes new
  positions in place; a buffer is reallocated (with ``GROWTH`` headroom) only when full, or
  when something outside ``update`` replaced ``keys``/``values`` (row selection, merging,
  trimming, ``crop``), so every cache operation above stays a plain tensor assignment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

GROWTH = 8  # a reallocated buffer has room for 1/GROWTH more positions (at least GROWTH_MIN)
GROWTH_MIN = 32


class GrowingLayer(DynamicLayer):
    """A full-attention ``DynamicLayer`` that appends in place (see the module docstring).

    ``keys``/``values`` are ``[B, heads, n, dim]`` views of buffers ``[B, heads, capacity, dim]``;
    the values are exactly those ``DynamicLayer`` would hold.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[str, torch.Tensor] = {}  # the view update() returned last: a prefix, no check needed

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._append("keys", key_states), self._append("values", value_states)

    def reset(self) -> None:
        self._buffers, self._views = {}, {}
        super().reset()

    def held_bytes(self) -> int:
        """Bytes the keys and values hold: a buffer's whole capacity where they are views of it."""
        total = 0
        for name in ("keys", "values"):
            t, buf = getattr(self, name, None), self._buffers.get(name)
            if isinstance(t, torch.Tensor):
                held = buf if buf is not None and t.dim() == buf.dim() and _prefix_of(t, buf, t.shape[-2]) else t
                total += held.numel() * held.element_size()
        return total

    def _append(self, name: str, new: torch.Tensor) -> torch.Tensor:
        buf, n = self._room(name, new.shape, new.dtype, new.device)
        end = n + new.shape[-2]
        buf.narrow(-2, n, end - n).copy_(new)
        return self._grown(name, end)

    def _room(self, name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device
              ) -> tuple[torch.Tensor, int]:
        """The buffer for ``name`` with room after its first n positions for ``shape[-2]`` more (rows and
        width as in ``shape``), and n; the history is copied over when the buffer had to be replaced."""
        cur = getattr(self, name)
        buf = self._buffers.get(name)
        n = cur.shape[-2] if cur.dim() == len(shape) else 0  # an empty cache holds a 1-D placeholder
        end = n + shape[-2]
        if buf is not None and cur is not self._views.get(name) and not _prefix_of(cur, buf, n):
            del self._buffers[name]  # replaced from outside: free the old buffer before allocating
            buf = None
        if buf is None or end > buf.shape[-2] or shape[:-2] != buf.shape[:-2] or dtype != buf.dtype \
                or shape[-1] != buf.shape[-1] or device != buf.device:
            capacity = held_positions(end)
            grown = torch.empty((*shape[:-2], capacity, shape[-1]), dtype=dtype, device=device)
            if n:
                grown.narrow(-2, 0, n).copy_(cur)
            self._buffers[name] = buf = grown
        return buf, n

    def _grown(self, name: str, end: int) -> torch.Tensor:
        view = self._views[name] = self._buffers[name].narrow(-2, 0, end)
        setattr(self, name, view)
        return view

    def room(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """For writers that fill the new positions themselves (``engine.attention``'s fused decode
        step): the key and value buffers with room after their first n positions for ``shape``'s
        (``[B, heads, T, dim]``, keys and values alike), and n; then :meth:`grow` by T. None before
        the first ``update`` (which initialises the layer) or when keys and values differ in shape."""
        if not self.is_initialized or self.keys.shape[:-2] != self.values.shape[:-2] \
                or self.keys.shape[-1] != self.values.shape[-1] or self.keys.dim() != len(shape):
            return None
        shape = torch.Size(shape)
        (kbuf, n), (vbuf, nv) = self._room("keys", shape, dtype, device), self._room("values", shape, dtype, device)
        return (kbuf, vbuf, n) if n == nv else None

    def grow(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Take ``t`` positions written after the history into ``keys``/``values``; returns both, as
        ``update`` does."""
        n = self.keys.shape[-2]
        return self._grown("keys", n + t), self._grown("values", n + t)


def held_positions(n: int) -> int:
    """The most positions a :class:`GrowingLayer` holding ``n`` positions has allocated."""
    return n + max(GROWTH_MIN, n // GROWTH)


def _prefix_of(t: torch.Tensor, buf: torch.Tensor, n: int) -> bool:
    """Whether ``t`` is ``buf[..., :n, :]`` (so appending after position n keeps it intact)."""
    if n == 0:
        return True
    return (t.data_ptr() == buf.data_ptr() and t.dtype == buf.dtype and t.device == buf.device
            and t.shape[:-2] == buf.shape[:-2] and t.shape[-1] == buf.shape[-1] and t.stride() == buf.stride())


def growing_cache(config) -> DynamicCache:
    """``DynamicCache(config=config)`` whose full-attention layers append in place (:class:`GrowingLayer`)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = GrowingLayer
    return cache


# Exact types: subclasses (indexer caches, linear attention, quantized) carry more state.
_MERGEABLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, GrowingLayer)


def is_mergeable(cache: DynamicCache) -> bool:
    """True if every layer of ``cache`` keeps only keys/values that can be row-merged here."""
    if type(cache) is not DynamicCache or getattr(cache, "offloading", False):
        return False
    for layer in cache.layers:
        if type(layer) not in _MERGEABLE_LAYERS or getattr(layer, "record_past", False):
            return False
    return True


class BatchKV:
    """A ``DynamicCache`` of B left-padded rows plus their attention mask ``[B, L]``."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask  # [B, L] int64, 1 for real tokens

    @property
    def num_rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def nbytes(self) -> int:
        """Bytes of every tensor the cache layers hold."""
        total = 0
        for layer in self.cache.layers:
            if isinstance(layer, GrowingLayer):
                total += layer.held_bytes()
                continue
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then drop leading all-padding columns."""
        if rows == list(range(self.num_rows)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        if not is_mergeable(self.cache):
            # Unknown layer types: transformers' own row selection, no trimming.
            self.cache.batch_select_indices(index)
            return
        for layer in self.cache.layers:
            if layer.is_initialized and layer.keys.numel() > 0:
                layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))
                layer.values = layer.values.index_select(0, index.to(layer.values.device))
        self._trim_left()

    def _trim_left(self) -> None:
        real_cols = self.mask.any(dim=0)  # [L]
        # sync: how many columns to cut is a host-side shape decision
        first = int(real_cols.int().argmax().item()) if self.num_rows else self.length
        if first == 0:
            return
        new_length = self.length - first
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            if not layer.is_initialized or layer.keys.numel() == 0:
                continue
            # A full layer keeps L positions, a sliding one min(L, window - 1): both become
            # min(kept, new_length), counted from the right.
            kept = layer.keys.shape[-2]
            keep = min(kept, new_length)
            layer.keys = layer.keys[..., kept - keep :, :]
            layer.values = layer.values[..., kept - keep :, :]
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length -= first

    def merge(self, other: BatchKV) -> None:
        """Append ``other``'s rows after this batch's rows (``other`` must not be used afterwards)."""
        length = max(self.length, other.length)
        self.mask = torch.cat([_left_pad(self.mask, length), _left_pad(other.mask, length)], dim=0)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            if not mine.is_initialized and not theirs.is_initialized:
                continue
            if not (mine.is_initialized and theirs.is_initialized):
                raise RuntimeError("cannot merge a KV cache layer that only one side has filled")
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)
                width = max(a.shape[-2], b.shape[-2])
                setattr(mine, name, torch.cat([_left_pad_seq(a, width), _left_pad_seq(b, width)], dim=0))
            if hasattr(mine, "cumulative_length"):
                mine.cumulative_length = max(mine.cumulative_length, theirs.cumulative_length)


def _left_pad(mask: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, l] -> [B, length]`` with zeros on the left."""
    return F.pad(mask, (length - mask.shape[1], 0), value=0)


def _left_pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim -2 (the sequence dim of a cache tensor) on the left up to ``length``."""
    missing = length - x.shape[-2]
    if missing == 0:
        return x
    return F.pad(x, (0, 0, missing, 0), value=0.0)
