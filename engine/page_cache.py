"""On-disk cache of quantized expert pages: quantize once, read the pages directly on later starts.

Design: a cache file is named by a key that hashes everything its bytes depend on
(the checkpoint's files by name, size and modification time, the page format, the
number of layers and experts, and this file format's version), so a changed
checkpoint or option never reuses a stale file: it simply misses. The file holds a
fixed header (magic, JSON with the key and one CRC-32 per MoE layer) and then the
pages, byte for byte. A file whose header, size, key or checksums do not match is
reported in one line and rebuilt, never trusted. Files are written to a temporary
name and renamed, so a crash mid-write leaves no half file under the real name.
The cache lives in its own directory (``--quant-cache-dir``, ``$MOEPAGER_CACHE_DIR``
or ``~/.cache/moepager/pages``), never in the model folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

MAGIC = b"MOEPAGES"
VERSION = 1
HEADER_BYTES = 4096


def default_cache_dir() -> Path:
    env = os.environ.get("MOEPAGER_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "pages"
    return Path.home() / ".cache" / "moepager" / "pages"


def cache_key(checkpoint_files: Iterable[Path], fmt_fields: dict, num_layers: int, num_experts: int) -> str:
    """A hex digest over what the cached bytes depend on."""
    ident = {
        "version": VERSION,
        "files": sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in checkpoint_files),
        "format": {k: str(v) for k, v in sorted(fmt_fields.items())},
        "layers": num_layers,
        "experts": num_experts,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def _layer_rows(pages: torch.Tensor, num_layers: int) -> list[torch.Tensor]:
    return list(pages.chunk(num_layers, dim=0)) if num_layers else []


def read_pages(path: Path, key: str, pages: torch.Tensor, num_layers: int,
               warn: Callable[[str], None] | None = None) -> bool:
    """Fill ``pages`` (uint8 [N, page_bytes]) from ``path``; False (after one warning line) when unusable."""
    warn = warn or (lambda msg: print(f"moepager: {msg}", file=sys.stderr, flush=True))
    if not path.is_file():
        return False
    expected = HEADER_BYTES + pages.numel()
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
            if len(head) != HEADER_BYTES or not head.startswith(MAGIC):
                warn(f"quantized page cache {path} is corrupt (bad header); rebuilding it")
                return False
            meta = json.loads(head[len(MAGIC):].rstrip(b"\0").decode())
            if meta.get("key") != key or meta.get("page_bytes") != pages.shape[1] or meta.get("rows") != pages.shape[0]:
                warn(f"quantized page cache {path} does not match this checkpoint and options; rebuilding it")
                return False
            if size != expected:
                warn(f"quantized page cache {path} is corrupt ({size} bytes, expected {expected}); rebuilding it")
                return False
            crcs = meta["crc32"]
            for layer, rows in enumerate(_layer_rows(pages, num_layers)):
                view = memoryview(rows.numpy()).cast("B")
                if f.readinto(view) != len(view) or zlib.crc32(view) != crcs[layer]:
                    warn(f"quantized page cache {path} is corrupt (layer {layer} checksum); rebuilding it")
                    return False
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        warn(f"quantized page cache {path} is unreadable ({type(exc).__name__}: {exc}); rebuilding it")
        return False
    return True


def write_pages(path: Path, key: str, pages: torch.Tensor, num_layers: int,
                warn: Callable[[str], None] | None = None) -> bool:
    """Write ``pages`` under ``path`` atomically; False (after one warning line) when the disk refuses."""
    warn = warn or (lambda msg: print(f"moepager: {msg}", file=sys.stderr, flush=True))
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        layers = _layer_rows(pages, num_layers)
        crcs = [zlib.crc32(memoryview(rows.numpy()).cast("B")) for rows in layers]
        meta = json.dumps({"key": key, "rows": pages.shape[0], "page_bytes": pages.shape[1], "crc32": crcs}).encode()
        if len(MAGIC) + len(meta) > HEADER_BYTES:
            raise ValueError("header too large")
        with open(tmp, "wb") as f:
            f.write((MAGIC + meta).ljust(HEADER_BYTES, b"\0"))
            f.writelines(memoryview(rows.numpy()).cast("B") for rows in layers)
        os.replace(tmp, path)
    except (OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        warn(f"cannot write the quantized page cache {path} ({exc}); the next start quantizes again")
        return False
    return True
