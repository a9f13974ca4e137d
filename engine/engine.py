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
import inspect
import itertools
import time
from collections.abc import Iterator
from typing import Self

import torch

from cache.base import build_policy, is_offline_only
from cache.manager import ExpertCache
from cuda_ext import select_expert_ffn
from engine.config import EngineConfig
from engine.errors import BudgetError, MoepagerError
from engine.loader import load_model, resolve_device, resolve_model_path
from engine.offload import ActiveStep, OffloadRuntime
from engine.transfer import build_transfer_engine

_IMPL_NAME = "moepager"


def _moepager_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    return self._moepager_runtime.forward(self, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> None:
    from transformers.integrations.moe import ExpertsInterface

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
    def __init__(self, config: EngineConfig) -> None:
        register_experts_implementation()
        self.config = config
        self.device = resolve_device(config.device)
        if config.emulate_link_gbps is not None and self.device.type != "cpu":
            raise MoepagerError("--emulate-link-gbps is for the CPU device only")
        if is_offline_only(config.cache_policy):
            raise MoepagerError(f"--cache-policy {config.cache_policy} needs the future: simulator only")
        path = resolve_model_path(config.model)
        capacities: list[int] = []

        def check_budget(store, top_k: int) -> None:
            capacities.extend(plan_capacities(store.num_layers, store.num_experts, top_k, store.page_bytes,
                                              config.cache_scope, config.expert_slots, config.expert_cache_gb))

        loaded = load_model(path, config.dtype, self.device, progress=config.progress, before_experts=check_budget)
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

        self.cache = ExpertCache(self._build_policy(config.cache_policy), self.num_moe_layers, capacities,
                                 config.cache_scope)
        self.cache_policy = config.cache_policy
        self.transfer = build_transfer_engine(self.device, config.emulate_link_gbps, config.emulate_link_latency_us)
        try:
            self.runtime = OffloadRuntime(self.store, self.cache, self.transfer, self.device, self.num_experts,
                                          self.store.page_bytes)
        except torch.OutOfMemoryError:
            raise BudgetError(
                f"{sum(capacities)} expert slots ({sum(capacities) * self.store.page_bytes / 1e9:.2f} GB) do not fit "
                f"on {self.device} next to the dense weights; lower --expert-slots / --expert-cache-gb") from None
        for i, (_, block, experts) in enumerate(loaded.moe_blocks):
            experts._moepager_layer = i
            experts._moepager_runtime = self.runtime
            experts._moepager_ffn = select_expert_ffn(experts, self.device)  # chosen once, never per call
        self.blocks = [block for _, block, _ in loaded.moe_blocks]
        if self.cache.num_slots >= self.num_moe_layers * self.num_experts:
            self._warm_all_slots()
        self.model.set_experts_implementation(_IMPL_NAME)
        self._setup_hybrid(loaded.moe_blocks[0][2])
        self._setup_prefetch()
        self._setup_routing()
        self._setup_recorder()
        self._seq_ids = itertools.count()  # sequence ids unique over the engine's life (traces need it)
        self.last_tokens_per_second = 0.0

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        return cls(config)

    @classmethod
    def from_pretrained(cls, path: str | None = None, **kwargs) -> Engine:
        return cls(EngineConfig(model=None if path is None else str(path), **kwargs))

    def _build_policy(self, name: str):
        """Build a policy, giving it the model's shape when its constructor asks for it."""
        from cache.base import _REGISTRY

        factory = _REGISTRY.get(name)
        kwargs = {}
        if factory is not None:
            params = inspect.signature(factory).parameters
            for key, value in (("num_layers", self.num_moe_layers), ("num_experts", self.num_experts)):
                if key in params:
                    kwargs[key] = value
        return build_policy(name, **kwargs)

    def _warm_all_slots(self) -> None:
        """Every expert fits: copy them all in at start-up, so no request ever waits on a cold miss."""
        from cache.base import ExpertKey
        from engine.transfer import DEMAND
        from traces.simulate import warm_if_everything_fits  # the simulator starts full the same way

        warm_if_everything_fits(self.cache, self.num_moe_layers, self.num_experts)
        handles = []
        for layer in range(self.num_moe_layers):
            for expert in range(self.num_experts):
                key = ExpertKey(layer, expert)
                slot = self.cache.slot_of(key)
                handles.append(self.transfer.copy(key, slot, self.store.page(layer, expert),
                                                  self.runtime.slots[slot], DEMAND))
        for handle in handles:
            self.transfer.wait(handle)
        self.runtime.counters.used_bytes = self.cache.used_slots() * self.store.page_bytes

    # -- optional parts ----------------------------------------------------------------
    def _setup_prefetch(self) -> None:
        cfg = self.config
        if cfg.prefetch == "none":
            return
        from prefetch.base import build_predictor
        from prefetch.base import is_offline_only as predictor_offline_only
        from prefetch.planner import PrefetchPlanner

        if predictor_offline_only(cfg.prefetch):
            raise MoepagerError(f"--prefetch {cfg.prefetch} needs the future: simulator only")
        from engine.arch import router_of

        routers = []
        for block in self.blocks:
            router = router_of(block)
            routers.append(lambda h, r=router: r(h)[2])
        self.runtime.predictor = build_predictor(
            cfg.prefetch, num_layers=self.num_moe_layers, num_experts=self.num_experts, top_k=self.top_k,
            lookahead=cfg.prefetch_lookahead, routers=routers, path=cfg.predictor_path)
        # Default: one token's worth of experts for each predicted layer; more only queues copies
        # behind each other so they land late.
        budget = (cfg.prefetch_budget_mb * 1e6 if cfg.prefetch_budget_mb is not None
                  else self.top_k * cfg.prefetch_lookahead * self.store.page_bytes)
        self.runtime.planner = PrefetchPlanner(self.store.page_bytes, int(budget))

    def _setup_hybrid(self, experts_module: torch.nn.Module) -> None:
        if self.config.cpu_compute == "never":
            return
        from engine.cost import calibrate

        hidden = self.store.layout.hidden
        self.runtime.hybrid = calibrate(self.config.cpu_compute, self.runtime, experts_module, hidden,
                                        self.config.emulate_link_gbps, self.config.emulate_link_latency_us)

    def _setup_routing(self) -> None:
        if self.config.route_from_trace is not None:
            if self.config.cache_aware_routing is not None:
                raise MoepagerError("--route-from-trace and --cache-aware-routing cannot be combined")
            from engine.routing import TraceReplayRouting

            self.runtime.routing = TraceReplayRouting(self, self.config.route_from_trace)
            return
        if self.config.cache_aware_routing is None:
            return
        from engine.routing import CacheAwareRouting

        self.runtime.routing = CacheAwareRouting(self, self.config.cache_aware_routing)

    def _setup_recorder(self) -> None:
        self.recorder = None
        if self.config.record_trace is None:
            return
        from traces.recorder import TraceRecorder

        meta = {"model": str(self.path), "architecture": self.model.config.model_type,
                    "moe_layers": self.moe_layer_ids, "experts": self.num_experts, "top_k": self.top_k}
        self.recorder = TraceRecorder(self.config.record_trace, meta)
        self.runtime.recorder = self.recorder

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
                if runtime.predictor is not None and hasattr(runtime.predictor, "begin_request"):
                    runtime.predictor.begin_request()
        if runtime.predictor is not None:
            runtime.predictor.reset()
        if self.recorder is not None:
            sel = real if real is not None else torch.ones_like(request, dtype=torch.bool)
            self.recorder.begin_step(request[sel], position[sel], int(info.phase),
                                     info.tokens.cpu()[sel] if info.tokens is not None else None)
        try:
            yield
        finally:
            runtime.active = None
            if self.recorder is not None:
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
        from engine.generation import BatchGenerator

        return BatchGenerator(self.model, self.tokenizer, self.device, max_batch_size=max_batch_size,
                              max_model_len=max_model_len or self.max_model_len, step_context=self.step_context,
                              seq_ids=self._seq_ids)

    def generate(self, prompts, params=None, *, max_batch_size: int = 16):
        """Yield TokenEvents for one or several prompts (lists of token ids) as they are produced."""
        from engine.generation import SamplingParams

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
        policy = self._build_policy(name)
        self.runtime.drain()
        self.cache.set_policy(policy)
        self.cache_policy = name

    @property
    def counters(self):
        return self.runtime.counters

    def stats(self) -> dict:
        c = self.runtime.counters
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
            "stall_seconds": sum(c.stall_seconds),
            "stall_seconds_prefill": c.stall_seconds[0],
            "stall_seconds_decode": c.stall_seconds[1],
            "prefetch": {"issued": c.prefetch_issued, "useful": c.prefetch_useful, "wasted": c.prefetch_wasted,
                          "late": c.prefetch_late},
            "cpu_computed": c.cpu_computed,
            "cpu_compute": self.runtime.hybrid.describe() if self.runtime.hybrid is not None else None,
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
        c = self.runtime.counters
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
        self.transfer.close()
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
