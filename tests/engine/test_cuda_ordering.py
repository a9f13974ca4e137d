"""The CUDA link's ordering, proven on the CPU with a test double of streams and events.

The double queues every copy, event record, event wait and compute "kernel" per stream and
runs them later, in adversarial orders (copies as early as the waits allow, or a seeded random
interleaving), honouring only what CUDA guarantees: FIFO per stream, and a wait blocks its
stream until the recorded event has run. Each queued kernel remembers which expert it must
find in its slot; the test fails when a copy overwrote that slot first, or had not landed yet.

``engine.transfer.CudaLink`` runs unchanged on the double, driven by ``cache.step.LayerStep``
on steps that need more experts than the scope holds (waves), with prefetching on.
"""

from __future__ import annotations

import random

import pytest

from cache.base import ExpertKey, build_policy
from cache.manager import ExpertCache
from cache.step import LayerStep, Prefetching, StepCounters
from engine.transfer import CudaLink
from prefetch.planner import PrefetchPlanner


class FakeEvent:
    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.pending: list[dict] = []  # record ops queued and not run

    def record(self, stream: FakeStream) -> None:
        op = {"kind": "record", "event": self, "ran": False}
        self.pending.append(op)
        stream.ops.append(op)

    def query(self) -> bool:
        return all(op["ran"] for op in self.pending)

    def synchronize(self) -> None:
        self.device.host_waits += 1
        self.device.run_until(self.query)

    def elapsed_time(self, other: FakeEvent) -> float:
        return 0.0


class FakeStream:
    def __init__(self, device: FakeDevice, name: str) -> None:
        self.device = device
        self.name = name
        self.ops: list[dict] = []
        device.streams.append(self)

    def wait_event(self, event: FakeEvent) -> None:
        # CUDA: the wait covers the event's most recent record at the time of the call.
        self.ops.append({"kind": "wait", "record": event.pending[-1] if event.pending else None})

    def synchronize(self) -> None:
        self.device.host_waits += 1
        self.device.run_until(lambda: not self.ops)


class FakeDevice:
    """Runs queued ops in an adversarial order; slots hold the key last copied into them."""

    def __init__(self, order: str, seed: int = 0) -> None:
        self.streams: list[FakeStream] = []
        self.order = order
        self.rng = random.Random(seed)
        self.slots: dict[int, ExpertKey] = {}
        self.violations: list[str] = []
        self.reads = 0
        self.host_waits = 0  # event or stream synchronizations: the host blocked

    def _runnable(self) -> list[FakeStream]:
        out = []
        for s in self.streams:
            if s.ops:
                op = s.ops[0]
                if op["kind"] != "wait" or op["record"] is None or op["record"]["ran"]:
                    out.append(s)
        return out

    def step(self) -> bool:
        ready = self._runnable()
        if not ready:
            return False
        if self.order == "copies_first":  # copies race ahead of compute as far as the waits allow
            copy = [s for s in ready if s.name == "copy"]
            stream = copy[0] if copy else ready[0]
        else:
            stream = self.rng.choice(ready)
        op = stream.ops.pop(0)
        if op["kind"] == "record":
            op["ran"] = True
        elif op["kind"] == "copy":
            self.slots[op["slot"]] = op["key"]
        elif op["kind"] == "read":
            self.reads += 1
            found = self.slots.get(op["slot"])
            if found != op["key"]:
                self.violations.append(f"kernel for {op['key']} read slot {op['slot']} holding {found}")
        return True

    def run_until(self, done) -> None:
        while not done():
            if not self.step():
                raise AssertionError("deadlock: nothing can run")

    def run_some(self, n: int) -> None:
        for _ in range(n):
            if not self.step():
                return


class FakeCuda:
    """The ``engine.transfer.TorchCuda`` calls, on the double."""

    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.compute = FakeStream(device, "compute")

    def stream(self) -> FakeStream:
        return FakeStream(self.device, "copy")

    def current_stream(self) -> FakeStream:
        return self.compute

    def event(self, timing: bool = False) -> FakeEvent:
        return FakeEvent(self.device)

    def copy(self, dst, src, stream: FakeStream) -> None:
        stream.ops.append({"kind": "copy", "slot": dst, "key": src})


class FakeStore:
    page_bytes = 1

    def page(self, layer: int, expert: int) -> ExpertKey:
        return ExpertKey(layer, expert)


class SlotIds:
    def __getitem__(self, slot: int) -> int:
        return slot


class ScriptedPredictor:
    """Guesses the next layer's experts of the same step (known in advance): prefetches land in waves."""

    def __init__(self, script: list[list[list[int]]]) -> None:
        self.script = script
        self.t = 0

    def observe(self, layer, hidden, top_k_index) -> None:
        return None

    def predict(self, layer: int):
        row = self.script[self.t]
        if layer + 1 >= len(row):
            self.t += 1
            return []
        return [(ExpertKey(layer + 1, e), 1.0) for e in row[layer + 1]]

    def reset(self) -> None:
        return None


class LayerFenceOnly(CudaLink):
    """The ordering before the fix: the copy stream waited only for the previous layer's compute."""

    def fence(self) -> None:
        return None

    def layer_done(self) -> None:
        CudaLink.fence(self)


def _drive(link_cls, order: str, seed: int, scope: str) -> FakeDevice:
    rng = random.Random(seed)
    layers, experts, per_step = 3, 8, 4
    script = [[rng.sample(range(experts), per_step) for _ in range(layers)] for _ in range(12)]
    capacities = [2] * layers if scope == "layer" else [3]  # every step needs two waves per layer
    cache = ExpertCache(build_policy("lru"), layers, capacities, scope)
    device = FakeDevice(order, seed)
    api = FakeCuda(device)
    link = link_cls(FakeStore(), SlotIds(), api)
    counters = StepCounters.create(layers, experts)
    prefetching = Prefetching(ScriptedPredictor(script), PrefetchPlanner(1, 2), cache, link, counters, 1)
    step = LayerStep(cache, link, counters, 1, prefetching)
    waves = 0
    for row in script:
        for layer, routed in enumerate(row):
            routed = sorted(routed)
            for wave in step.run(layer, routed, [1] * len(routed), 1, None, None):
                waves += 1
                for expert, slot in zip(wave.experts, wave.slots):
                    api.compute.ops.append({"kind": "read", "slot": slot, "key": ExpertKey(layer, expert)})
            if isinstance(link, LayerFenceOnly):
                link.layer_done()
            device.run_some(rng.randint(0, 6))  # the device runs behind the host by a random amount
    assert device.host_waits == 0, "the step blocked the host on the device"
    for stream in device.streams:
        stream.synchronize()
    assert waves > len(script) * layers, "the steps must need waves"
    if scope == "layer":  # a global scope smaller than one step has every resident expert needed now
        assert counters.prefetch_copies > 0, "prefetch copies must take part"
    assert device.reads == sum(len(layer) for row in script for layer in row)
    return device


ORDERS = [("copies_first", 0)] + [("random", seed) for seed in range(1, 6)]


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("order,seed", ORDERS)
def test_no_copy_overwrites_a_slot_before_its_kernels_read_it(order, seed, scope):
    device = _drive(CudaLink, order, seed, scope)
    assert device.violations == []


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_the_double_catches_a_fence_per_layer_only(scope):
    """Fencing only after a whole layer (the old ordering) lets wave 2's copies overwrite wave 1's slots."""
    device = _drive(LayerFenceOnly, "copies_first", 0, scope)
    assert device.violations, "the adversarial order should have exposed the race"


class NoComputeWait(CudaLink):
    """A link whose compute never waits for the copies it needs."""

    def wait(self, handles, clock, phase) -> None:
        return None


def test_the_double_catches_compute_that_does_not_wait():
    device = _drive(NoComputeWait, "random", 1, "layer")
    assert device.violations
