"""Continuous batching between asyncio request handlers and the one thread that owns the engine.

Design: the engine is not thread-safe, so exactly one worker thread touches it. Handlers on
the event loop never call the engine; they post commands (add, remove, call) to a queue the
worker drains between ``BatchGenerator.step()`` calls, so sequences join and leave the batch
at step boundaries. Token events flow back through one ``asyncio.Queue`` per sequence via
``loop.call_soon_threadsafe``. Admission is decided on the loop side before anything is
queued: a full waiting queue is a 429, never unbounded memory.

KV memory: each sequence's worst case (prompt + max tokens) is reserved before it joins the
batch. The batch cache is a rectangle (rows are left-padded to the longest), so the check is
``rows x longest worst case x bytes per token <= budget``; a sequence that does not fit waits
(FIFO) until others finish, and one that could never fit is refused at submission. Nothing is
allocated for a sequence before its reservation holds. Serving metrics (TTFT, ITL,
e2e, token counts) are recorded here, where every token passes exactly once, so they are
right for streaming, non-streaming and disconnected clients alike.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from engine.kv_rows import held_positions

log = logging.getLogger("moepager.scheduler")


class QueueFullError(Exception):
    """The waiting queue cannot take the request now; retry later."""


class KVBudgetError(Exception):
    """A sequence's worst case exceeds the whole KV budget: it can never run."""


@dataclass
class _Sequence:
    events: asyncio.Queue
    arrival: float
    num_prompt_tokens: int
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_generated: int = 0
    finished: bool = False
    extra: dict = field(default_factory=dict)


class SequenceStream:
    """Async iterator over one sequence's ``TokenEvent``s; ends after the finishing event."""

    def __init__(self, scheduler: Scheduler, request_id: str, seq: _Sequence) -> None:
        self.scheduler = scheduler
        self.request_id = request_id
        self._seq = seq
        self._done = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        item = await self._seq.events.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def abort(self) -> None:
        """Remove the sequence from the batch (frees its KV cache); safe after it finished."""
        if not self._done:
            self._done = True
            self.scheduler.abort(self.request_id)


class Scheduler:
    def __init__(self, engine: Any, *, max_num_seqs: int, max_queued: int, max_model_len: int,
                 metrics: Any = None, kv_budget_bytes: int | None = None, kv_bytes_per_token: int = 0) -> None:
        self.engine = engine
        self.kv_budget_bytes = kv_budget_bytes
        self.kv_bytes_per_token = kv_bytes_per_token
        self._pending: deque[tuple[str, list[int], Any, int]] = deque()  # worker thread only
        self._reserved: dict[str, int] = {}  # admitted sequence -> worst-case tokens; worker thread only
        self.max_num_seqs = max_num_seqs
        self.max_queued = max_queued
        self.max_model_len = max_model_len
        self.metrics = metrics
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._active: dict[str, _Sequence] = {}
        self._running = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._generator: Any = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._generator = self.engine.batch_generator(self.max_num_seqs, self.max_model_len)
        self._thread = threading.Thread(target=self._run, name="moepager-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._commands.put(lambda: None)  # wake the worker
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- counts (read from any thread) -----------------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_running(self) -> int:
        return min(self._running, len(self._active))

    @property
    def num_waiting(self) -> int:
        return max(0, len(self._active) - self.num_running)

    def is_idle(self) -> bool:
        return not self._active

    # ---- loop side -------------------------------------------------------------------------
    def submit_group(self, items: list[tuple[str, list[int], Any]]) -> list[SequenceStream]:
        """Admit all sequences of one request or none of them (QueueFullError)."""
        now = time.perf_counter()
        streams = []
        if self.kv_budget_bytes is not None:
            for _, prompt_ids, params in items:
                need = held_positions(len(prompt_ids) + params.max_tokens) * self.kv_bytes_per_token
                if need > self.kv_budget_bytes:
                    raise KVBudgetError(
                        f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) needs "
                        f"{need / 1e6:.1f} MB of KV cache; the whole budget is {self.kv_budget_bytes / 1e6:.1f} MB "
                        "(--kv-cache-gb); lower max_tokens")
        with self._lock:
            total = len(self._active) + len(items)
            if total - min(total, self.max_num_seqs) > self.max_queued:
                raise QueueFullError(f"{len(self._active)} sequences in flight; the waiting queue "
                                     f"(--max-queued {self.max_queued}) is full")
            for request_id, prompt_ids, params in items:
                seq = _Sequence(events=asyncio.Queue(), arrival=now, num_prompt_tokens=len(prompt_ids))
                self._active[request_id] = seq
                streams.append(SequenceStream(self, request_id, seq))
        for request_id, prompt_ids, params in items:
            self._commands.put(lambda r=request_id, p=prompt_ids, s=params: self._add(r, p, s))
        self._update_gauges()
        return streams

    def abort(self, request_id: str) -> None:
        with self._lock:
            seq = self._active.pop(request_id, None)
        if seq is None or seq.finished:
            return
        seq.finished = True
        if self.metrics is not None:
            self.metrics.request_success.labels(finished_reason="abort").inc()
        self._commands.put(lambda: self._remove(request_id))
        self._update_gauges()

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(engine)`` on the worker thread between steps and await its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result = fn(self.engine)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting handler
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        self._commands.put(run)
        return await future

    # ---- worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        gen = self._generator
        while not self._stopping.is_set():
            self._drain_commands(block=not gen.has_work)
            if self._stopping.is_set():
                break
            self._admit()
            if not gen.has_work:
                continue
            try:
                events = gen.step()
            except Exception as exc:  # fail the batch, keep serving
                log.exception("engine step failed; aborting %d sequences", len(self._active))
                self._fail_all(exc)
                continue
            for event in events:
                self._dispatch(event)
            self._running = gen.num_running
            self._update_gauges()
            self._update_kv_gauges()

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, request_id: str, prompt_ids: list[int], params: Any) -> None:
        if request_id in self._active:  # else aborted before it reached the worker
            self._pending.append((request_id, prompt_ids, params, len(prompt_ids) + params.max_tokens))

    def _fits(self, worst: int) -> bool:
        if self.kv_budget_bytes is None:
            return True
        return self._kv_reserved_bytes(extra=worst) <= self.kv_budget_bytes

    def _kv_reserved_bytes(self, extra: int | None = None) -> int:
        rows = len(self._reserved) + (extra is not None)
        longest = max([*self._reserved.values(), extra or 0], default=0)
        return rows * held_positions(longest) * self.kv_bytes_per_token  # with the KV layers' room to grow

    def _admit(self) -> None:
        """Move waiting sequences into the generator while their KV reservation fits (FIFO)."""
        while self._pending:
            request_id, prompt_ids, params, worst = self._pending[0]
            if request_id not in self._active:
                self._pending.popleft()
                continue
            if self._reserved and not self._fits(worst):
                return
            self._pending.popleft()
            self._reserved[request_id] = worst
            try:
                self._generator.add(request_id, prompt_ids, params)
            except Exception as exc:  # noqa: BLE001 - a rejected sequence fails alone
                self._reserved.pop(request_id, None)
                self._deliver_error(request_id, exc)
        self._running = self._generator.num_running

    def _remove(self, request_id: str) -> None:
        self._reserved.pop(request_id, None)
        try:
            self._generator.remove(request_id)
        except (KeyError, ValueError):
            pass  # already finished inside the generator
        self._running = self._generator.num_running

    def _dispatch(self, event: Any) -> None:
        seq = self._active.get(event.request_id)
        if event.finished:
            self._reserved.pop(event.request_id, None)
        if seq is None or seq.finished:
            return  # aborted: the client is gone
        now = time.perf_counter()
        m = self.metrics
        new_tokens = max(0, event.num_generated_tokens - seq.num_generated)
        if new_tokens:
            if seq.first_token_at is None:
                seq.first_token_at = now
                if m is not None:
                    m.ttft.observe(now - seq.arrival)
                    m.prompt_tokens.inc(event.num_prompt_tokens)
            elif m is not None and seq.last_token_at is not None:
                m.itl.observe(now - seq.last_token_at)
            seq.last_token_at = now
            seq.num_generated = event.num_generated_tokens
            if m is not None:
                m.generation_tokens.inc(new_tokens)
        if event.finished:
            seq.finished = True
            with self._lock:
                self._active.pop(event.request_id, None)
            if m is not None:
                m.e2e.observe(now - seq.arrival)
                m.request_success.labels(finished_reason=event.finish_reason or "stop").inc()
        self._loop.call_soon_threadsafe(seq.events.put_nowait, event)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            seq = self._active.pop(request_id, None)
        if seq is not None:
            seq.finished = True
            self._loop.call_soon_threadsafe(seq.events.put_nowait, exc)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in list(self._active):
            self._remove(request_id)
            self._deliver_error(request_id, RuntimeError(f"engine step failed: {type(exc).__name__}: {exc}"))
        self._update_gauges()

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(self.num_running)
            self.metrics.waiting.set(self.num_waiting)

    def _update_kv_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.kv_used.set(self._generator.kv_bytes())
            self.metrics.kv_reserved.set(self._kv_reserved_bytes())
            if self.kv_budget_bytes is not None:
                self.metrics.kv_budget.set(self.kv_budget_bytes)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
