"""Memory budgets chosen at start-up: KV cache bytes per token, the default KV budget, and the
device's free memory.

Design
- Bytes per token are measured, not derived from the config: one forward of one token fills
  a fresh cache, whose bytes are what every later token costs (MLA latents, different key and
  value widths and sliding windows included; a sliding layer's cost per token stops growing
  at its window, so the measure is an upper bound).
- The default budget is what ``--max-num-seqs`` full-length sequences need, capped by a share
  of the memory free once the model is loaded. The share is below half because joining a
  prefilled group to the running batch copies both caches for a moment.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

FREE_MEMORY_SHARE = 0.45


def free_memory_bytes(device: torch.device) -> int:
    """Free memory where the KV cache lives: the GPU's, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_bytes_per_token(engine: Any) -> int:
    """KV cache bytes one token costs in this engine's model (measured with a one-token forward).
    The probe row is marked as padding, so no expert runs for it and no trace or cache statistic
    sees it."""
    from transformers import DynamicCache

    from engine.generation import PREFILL, StepInfo, cache_argument
    from engine.kv_rows import BatchKV

    model, device = engine.model, engine.device
    cache = DynamicCache(config=model.config)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    info = StepInfo(valid=torch.zeros(1, dtype=torch.bool, device=device), request=torch.full((1,), -1),
                    position=torch.full((1,), -1), phase=PREFILL, tokens=ids.reshape(-1))
    step_context = getattr(engine, "step_context", None)
    with torch.no_grad(), (step_context(info) if step_context is not None else contextlib.nullcontext()):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.zeros_like(ids),
              use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
    return max(1, BatchKV(cache, torch.ones(1, 1)).nbytes())


def default_kv_budget(bytes_per_token: int, max_num_seqs: int, max_model_len: int, free_bytes: int) -> int:
    """``max_num_seqs`` full-length sequences (with the KV layers' room to grow), capped by a share
    of free memory; at least one."""
    from engine.errors import BudgetError
    from engine.kv_rows import held_positions

    one = bytes_per_token * held_positions(max_model_len)
    full = one * max_num_seqs
    budget = min(full, int(free_bytes * FREE_MEMORY_SHARE))
    if budget < one:
        raise BudgetError(f"one {max_model_len}-token sequence needs {one / 1e9:.2f} GB of KV cache and only "
                          f"{free_bytes / 1e9:.2f} GB is free; lower --max-model-len or the expert budget")
    return budget


HEADROOM_BYTES = 1 << 30  # CUDA context, allocator fragmentation, activations


def checkpoint_split_bytes(model: str | None, dtype: torch.dtype) -> tuple[int, int]:
    """(dense bytes, routed-expert bytes) of a checkpoint at ``dtype``, from its safetensors headers."""
    from engine.arch import parse_expert_key
    from engine.loader import resolve_model_path
    from engine.safetensors_io import CheckpointReader

    reader = CheckpointReader(resolve_model_path(model))
    dense = experts = 0
    size = torch.tensor([], dtype=dtype).element_size()
    for name in list(reader):
        numel = 1
        for d in reader.shape(name):
            numel *= d
        if parse_expert_key(name) is not None or ".experts." in name:
            experts += numel * size
        else:
            dense += numel * size
    return dense, experts


def auto_expert_cache_gb(free_bytes: int, dense_bytes: int, kv_reserve_bytes: int) -> float:
    """Device memory left for expert slots once the dense weights, the KV reserve and a headroom
    are set aside; raises if nothing is left."""
    from engine.errors import BudgetError

    left = free_bytes - dense_bytes - kv_reserve_bytes - HEADROOM_BYTES
    if left <= 0:
        raise BudgetError(f"--expert-cache-gb auto: {free_bytes / 1e9:.2f} GB free holds neither the dense weights "
                          f"({dense_bytes / 1e9:.2f} GB) plus the KV reserve ({kv_reserve_bytes / 1e9:.2f} GB) nor "
                          "any expert slot; lower --kv-cache-gb or --max-model-len")
    return left / 1e9
