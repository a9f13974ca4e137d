"""Read tensors straight out of safetensors files into caller-owned memory.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page it
touches counts towards the process's resident memory until unmapped, so copying
a whole checkpoint into host pages would peak near twice the checkpoint. Here
each tensor is read with ``readinto`` directly into its destination (or through
one small staging buffer when the dtype changes), so the host RAM peak stays
near the size of the destination pages.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch

from engine.errors import ModelLoadError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    _DTYPES["F8_E5M2"] = torch.float8_e5m2


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse one safetensors file's header: tensor entries and the free-form metadata."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelLoadError(f"{path}: not a safetensors file (too short)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > 100_000_000:
                raise ModelLoadError(f"{path}: not a safetensors file (header of {header_len} bytes)")
            header = json.loads(f.read(header_len))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read safetensors header ({exc})") from None
    base = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    entries = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ModelLoadError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        entries[name] = TensorEntry(path, dtype, tuple(info["shape"]), base + start, end - start)
    return entries, metadata


class CheckpointReader:
    """All tensors of a Hugging Face folder: one file, or shards with or without an index."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ModelLoadError(f"{index}: malformed index ({exc})") from None
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(f"missing shard {missing[0]} listed in {index.name} (in {self.folder})")
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise ModelLoadError(f"no *.safetensors weights in {self.folder}")
        self.files = files
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            entries, _ = read_header(file)
            self.entries.update(entries)
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        out = torch.empty(entry.shape, dtype=entry.dtype)
        self._readinto(entry, out)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill ``out`` (contiguous, CPU, same number of elements) with tensor ``name``, casting if needed."""
        entry = self.entries[name]
        numel = 1
        for d in entry.shape:
            numel *= d
        if out.numel() != numel:
            raise ModelLoadError(f"{name}: expected {numel} elements, destination holds {out.numel()}")
        if out.dtype == entry.dtype and out.is_contiguous():
            self._readinto(entry, out)
        else:
            staged = torch.empty(entry.shape, dtype=entry.dtype)
            self._readinto(entry, staged)
            out.copy_(staged.view(out.shape))

    def _readinto(self, entry: TensorEntry, out: torch.Tensor) -> None:
        handle = self._handles.get(entry.file)
        if handle is None:
            handle = open(entry.file, "rb", buffering=0)  # noqa: SIM115 - closed in close()
            self._handles[entry.file] = handle
        if entry.nbytes == 0:
            return
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        handle.seek(entry.start)
        got = 0
        while got < entry.nbytes:
            n = handle.readinto(view[got:])
            if not n:
                raise ModelLoadError(f"{entry.file}: truncated (wanted {entry.nbytes} bytes at {entry.start})")
            got += n

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
