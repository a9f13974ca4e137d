"""The Engine: one offloaded MoE model, its expert cache, and generation over it.

    engine = Engine.from_pretrained("path/to/hf-folder", device="cpu", expert_slots=64)
    logits = engine.logits(input_ids)                       # [B, T, V]
    for event in engine.generate([ids], SamplingParams(max_tokens=32, temperature=0)): ...
    engine.stats()

The model is a plain transformers model whose experts implementation is
"moepager" (``ExpertsInterface``): the one seam, no patching of modeling code.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import torch
from transformers.integrations.moe import ExpertsInterface

from cache.base import is_offline_only
from cuda_ext import cpu_kernel_status, native_cpu, native_status, select_expert_ffn
from cuda_ext.linear_group import group_sibling_linears
from engine.attention import use_decode_blocks, use_native_attention
from engine.build import LinkFactory, build_policy, build_runtime
from engine.config import EngineConfig
from engine.dense import use_int8_dense, use_native_dense, use_native_norms
from engine.errors import BudgetError, MoepagerError
from engine.generation import BatchGenerator, SamplingParams
from engine.loader import load_model, resolve_device, resolve_model_path
from engine.offload import ActiveStep
from engine.page_cache import default_cache_dir

_IMPL_NAME = "moepager"


def _moepager_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    return self._moepager_runtime.forward(self, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> None:
    ExpertsInterface.register(_IMPL_NAME, _moepager_experts_forward)


def plan_capacities(num_layers: int, num_experts: int, top_k: int, page_bytes: int, scope: str,
                    expert_slots: int | None, expert_cache_gb: float | None) -> list[int]:
    """Slots per cache scope from the budget; raises BudgetError naming the minimum."""
    total = num_layers * num_experts
    if expert_slots is not None:
        slots = expert_slots
    elif expert_cache_gb is not None:
        slots = int(expert_cache_gb * 1e9 // page_bytes)
    else:
        slots = total
    minimum = top_k * num_layers if scope == "layer" else top_k
    if slots < minimum:
        flag = "--expert-slots" if expert_slots is not None else "--expert-cache-gb"
        raise BudgetError(
            f"{flag}: budget of {slots} expert slots is below the minimum of {minimum} "
            f"({'top_k ' + str(top_k) + ' per layer x ' + str(num_layers) + ' MoE layers' if scope == 'layer' else 'top_k'}"
            f"; {_human_bytes(minimum * page_bytes)} at {_human_bytes(page_bytes)} per expert)")
    slots = min(slots, total)
    if scope == "global":
        return [slots]
    base, rem = divmod(slots, num_layers)
    return [min(num_experts, base + (1 if i < rem else 0)) for i in range(num_layers)]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


class Engine:
    def __init__(self, config: EngineConfig, *, link_factory: LinkFactory | None = None) -> None:
        """``link_factory(store, slots)`` replaces the device's link (tests: a deterministic clock)."""
        register_experts_implementation()
        self.config = config
        self.device = resolve_device(config.device)
        if config.emulate_link_gbps is not None and self.device.type != "cpu":
            raise MoepagerError("--emulate-link-gbps is for the CPU device only")
        if config.dense_dtype == "int8" and self.device.type != "cpu":
            raise MoepagerError(f"--dense-dtype int8 is built for the CPU device only, not {self.device.type}; "
                                "use --dense-dtype auto")
        if is_offline_only(config.cache_policy):
            raise MoepagerError(f"--cache-policy {config.cache_policy} needs the future: simulator only")
        path = resolve_model_path(config.model)
        capacities: list[int] = []

        def check_budget(store, top_k: int) -> None:
            capacities.extend(plan_capacities(store.num_layers, store.num_experts, top_k, store.page_bytes,
                                              config.cache_scope, config.expert_slots, config.expert_cache_gb))

        cache_dir = Path(config.quant_cache_dir).expanduser() if config.quant_cache_dir else default_cache_dir()
        loaded = load_model(path, config.dtype, self.device, progress=config.progress, before_experts=check_budget,
                            expert_dtype=config.expert_dtype, group_size=config.int4_group_size, cache_dir=cache_dir)
        self.path = path
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.store = loaded.store
        self.checkpoint_bytes = loaded.checkpoint_bytes
        self.top_k = loaded.top_k
        self.num_experts = loaded.num_experts
        self.moe_layer_ids = [layer for layer, _, _ in loaded.moe_blocks]
        self.num_moe_layers = len(self.moe_layer_ids)
        self.model_name = path.name if config.model else "moepager-default"
        text_config = self.model.config.get_text_config()
        self.max_model_len = int(config.max_model_len or getattr(text_config, "max_position_embeddings", 4096))

        parts = build_runtime(config, loaded, self.device, capacities, model_name=str(path), link_factory=link_factory)
        self.shape = parts.shape
        self.cache = parts.cache
        self.link = parts.link
        self.runtime = parts.runtime
        self.recorder = parts.recorder
        self.hybrid = parts.hybrid
        self.zero_copy = parts.zero_copy
        self.cache_policy = config.cache_policy
        for i, (_, _block, experts) in enumerate(loaded.moe_blocks):
            experts._moepager_layer = i
            experts._moepager_runtime = self.runtime
            experts._moepager_ffn = select_expert_ffn(experts, self.device)  # chosen once, never per call
        self.blocks = [block for _, block, _ in loaded.moe_blocks]
        self.model.set_experts_implementation(_IMPL_NAME)
        # The dense path on the CPU takes the native linear kernel too (built once, just above).
        native_host = self.device.type == "cpu" and native_cpu.available()
        self.int8_dense = use_int8_dense(self.model) if config.dense_dtype == "int8" else 0
        self.native_dense = use_native_dense(self.model) if native_host else 0
        self.native_norms = use_native_norms(self.model) if native_host else 0
        self.linear_groups = group_sibling_linears(self.model) if native_host else 0
        self.native_attention = use_native_attention(self.model) if native_host else False
        self.decode_blocks = use_decode_blocks(self.model) if self.native_attention else 0
        if config.progress:
            k = self.kernels()
            print(f"moepager: expert pages {k['expert_pages']}, experts computed by {k['expert_compute']}, "
                  f"CPU kernels {k['moe_ffn']} (CPU ISA {k['cpu_isa']}), {self.native_dense} dense layers, "
                  f"{self.int8_dense} int8 dense layers, {self.native_norms} norms native and "
                  f"{self.linear_groups} groups of sibling linears fused; decode attention "
                  f"{'native' if self.native_attention else 'transformers'}, {self.decode_blocks} attention "
                  "blocks fused",
                  file=sys.stderr, flush=True)
        self._seq_ids = itertools.count()  # sequence ids unique over the engine's life (traces need it)
        self.last_tokens_per_second = 0.0

    def kernels(self) -> dict:
        """Which implementation serves each op, for /version and the start-up log."""
        fmt = self.store.fmt
        pages = fmt.kind if fmt.kind != "float" else str(fmt.dtype).removeprefix("torch.")
        if fmt.kind == "int4":
            pages += f" (group {fmt.group_size})"
        return {**cpu_kernel_status(), "expert_pages": pages,
                "expert_compute": type(self.runtime.compute).__name__,
                "host_expert_compute": type(self.runtime.host_compute).__name__,
                "dense_native_layers": self.native_dense, "dense_int8_layers": self.int8_dense,
                "norm_native_layers": self.native_norms, "linear_groups": self.linear_groups,
                "decode_attention": "native" if self.native_attention else "transformers",
                "attention_blocks_fused": self.decode_blocks,
                "cuda_expert_ffn": native_status()}

    @classmethod
    def from_config(cls, config: EngineConfig, **kwargs) -> Engine:
        return cls(config, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | None = None, *, link_factory: LinkFactory | None = None,
                        **kwargs) -> Engine:
        return cls(EngineConfig(model=None if path is None else str(path), **kwargs), link_factory=link_factory)

    @property
    def transfer(self):
        """The link that moves pages into slots (``cache.step.Link``)."""
        return self.link

    # -- forward passes ----------------------------------------------------------------
    @contextlib.contextmanager
    def step_context(self, info) -> Iterator[None]:
        """Wrap one model forward: tells the experts function which rows are real and which phase runs."""
        valid = getattr(info, "valid", None)
        rows = None
        if valid is not None and not bool(valid.all()):
            rows = valid.nonzero().squeeze(1).to(self.device)
        runtime = self.runtime
        runtime.active = ActiveStep(rows, int(info.phase))
        runtime.counters.forward_steps += 1
        # Row metadata comes from the host side of the generation loop; bring it over once.
        request = info.request.cpu() if getattr(info, "request", None) is not None else None
        position = info.position.cpu() if getattr(info, "position", None) is not None else None
        real = valid.cpu() if valid is not None else None
        if request is not None and position is not None:
            # A sequence whose position 0 is in this forward starts here (first-appearance order).
            first = position == 0
            if real is not None:
                first &= real
            for rid in dict.fromkeys(request[first].tolist()):
                self.cache.start_request(rid)
                runtime.prefetching.begin_request()
        runtime.prefetching.reset()
        recording = self.config.record_trace is not None
        # The real rows' input ids, the rows the layers route (padding never reaches the experts
        # function), brought to the host once for whoever reads them.
        tokens = getattr(info, "tokens", None) if recording or runtime.prefetching.wants_tokens else None
        if tokens is not None:
            tokens = tokens.cpu().reshape(-1)
            if real is not None:
                tokens = tokens[real]
            if runtime.prefetching.wants_tokens:
                runtime.prefetching.observe_tokens(tokens.numpy())
        if recording:
            sel = real if real is not None else torch.ones_like(request, dtype=torch.bool)
            self.recorder.begin_step(request[sel], position[sel], int(info.phase), tokens)
        try:
            yield
        finally:
            runtime.active = None
            self.recorder.end_step()

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full-sequence logits [B, T, V] (float32, on the CPU) of one forward pass."""
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        out = self.model(input_ids=input_ids.to(self.device),
                         attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                         use_cache=False)
        return out.logits.float().cpu()

    def batch_generator(self, max_batch_size: int = 16, max_model_len: int | None = None):
        return BatchGenerator(self.model, self.tokenizer, self.device, max_batch_size=max_batch_size,
                              max_model_len=max_model_len or self.max_model_len, step_context=self.step_context,
                              seq_ids=self._seq_ids)

    def generate(self, prompts, params=None, *, max_batch_size: int = 16):
        """Yield TokenEvents for one or several prompts (lists of token ids) as they are produced."""
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        if params is None:
            params = SamplingParams()
        param_list = params if isinstance(params, list) else [params] * len(prompts)
        gen = self.batch_generator(max_batch_size=max_batch_size)
        for i, (prompt, p) in enumerate(zip(prompts, param_list)):
            gen.add(i, list(prompt), p)
        start = time.perf_counter()
        produced = 0
        with torch.no_grad():
            while gen.has_work:
                for event in gen.step():
                    if event.token_id is not None:
                        produced += 1
                    yield event
        elapsed = time.perf_counter() - start
        self.last_tokens_per_second = produced / elapsed if elapsed > 0 else 0.0

    # -- control and introspection --------------------------------------------------------
    def set_cache_policy(self, name: str) -> None:
        if is_offline_only(name):
            raise ValueError(f"cache policy {name!r} needs the future and runs only in the simulator")
        policy = build_policy(name, self.shape)
        self.runtime.drain()
        self.cache.set_policy(policy)
        self.cache_policy = name

    @property
    def counters(self):
        return self.runtime.step.sync_counters()

    def stats(self) -> dict:
        c = self.counters
        queries = sum(map(sum, c.queries))
        hits = sum(map(sum, c.hits))
        return {
            "hits": hits,
            "misses": queries - hits,
            "queries": queries,
            "hit_rate": hits / queries if queries else 0.0,
            "hits_per_layer": [c.hits[0][i] + c.hits[1][i] for i in range(c.num_layers)],
            "queries_per_layer": [c.queries[0][i] + c.queries[1][i] for i in range(c.num_layers)],
            "decode_hit_rate": sum(c.hits[1]) / sum(c.queries[1]) if sum(c.queries[1]) else 0.0,
            "bytes_transferred": c.demand_bytes + c.prefetch_bytes,
            "demand_bytes": c.demand_bytes,
            "prefetch_bytes": c.prefetch_bytes,
            "bytes_saved": c.bytes_saved(),
            "stall_seconds": sum(c.stall_seconds),
            "stall_seconds_prefill": c.stall_seconds[0],
            "stall_seconds_decode": c.stall_seconds[1],
            "prefetch": {"issued": c.prefetch_issued, "useful": c.prefetch_useful, "wasted": c.prefetch_wasted,
                          "late": c.prefetch_late, "cancelled": c.prefetch_cancelled},
            "cpu_computed": c.cpu_computed,
            "cpu_compute": self.hybrid.describe() if self.hybrid is not None else None,
            "routing_substitutions": c.routing_substitutions,
            "expert_slots": self.cache.num_slots,
            "expert_cache_capacity_bytes": c.capacity_bytes,
            "expert_cache_used_bytes": c.used_bytes,
            "forward_steps": c.forward_steps,
            "tokens_per_second": self.last_tokens_per_second,
            "cache_policy": self.cache_policy,
            "prefetch_name": self.config.prefetch,
            "device": str(self.device),
        }

    def expert_stats(self) -> dict:
        c = self.counters
        resident = [[k.expert for k in self.cache.resident(layer)] for layer in range(self.num_moe_layers)]
        return {
            "moe_layers": self.moe_layer_ids,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "activations": [list(row) for row in c.activations],
            "resident": [sorted(r) for r in resident],
            "hits": [c.hits[0][i] + c.hits[1][i] for i in range(c.num_layers)],
            "queries": [c.queries[0][i] + c.queries[1][i] for i in range(c.num_layers)],
            "cache_policy": self.cache_policy,
        }

    def close(self) -> None:
        self.runtime.drain()
        self.link.close()
        self.runtime.routing.close()
        self.recorder.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
