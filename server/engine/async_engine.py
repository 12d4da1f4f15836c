"""Async front: runs LLMEngine.step() in one background thread, streams deltas to asyncio.

Each request gets an asyncio.Queue; the engine thread posts deltas into the event
loop with call_soon_threadsafe. Adds and aborts are posted to the engine thread's
inbox, so only that thread ever touches the engine. A generator closed early (client
disconnect) aborts its request, which frees its KV blocks. Woken from idle, the thread may
first gather a burst of requests into one first step (SchedulerConfig.burst_wait_ms; off by
default).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from server.engine.engine import LLMEngine, RequestError
from server.engine.messages import SequenceDelta
from server.engine.sequence import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    method: Any = None  # server.methods: a LogitMethod or SearchMethod


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    """Run fn(engine) on the engine thread and resolve `future` with its result."""

    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class EngineDeadError(RuntimeError):
    """The engine thread crashed; the server cannot generate any more."""


class AsyncEngine:
    """Thread-backed asyncio facade over LLMEngine."""

    def __init__(self, engine: LLMEngine, on_step: Callable[[LLMEngine], None] | None = None) -> None:
        self.engine = engine
        self.on_step = on_step
        self._inbox: queue.Queue = queue.Queue()
        self._outputs: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="alignserve-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_healthy(self) -> bool:
        return self._error is None and self._thread.is_alive()

    def shutdown(self) -> None:
        self._stopped.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    # ---- engine thread ---------------------------------------------------------------
    def _drain_inbox(self, block: bool, timeout: float = 0.1) -> bool:
        """Apply queued adds/aborts (waiting up to `timeout` for the first if `block`); True if
        anything was applied."""
        applied = False
        while True:
            try:
                item = self._inbox.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return applied
            block = False
            applied = True
            if item is None:
                return applied
            if isinstance(item, _Add):
                try:
                    adapter_id = self.engine.resolve_adapter(item.adapter)
                    self.engine.add_request(item.request_id, item.prompt_token_ids, item.params, adapter_id,
                                            method=item.method)
                    self._outputs[item.request_id] = (item.out, item.loop)
                    item.loop.call_soon_threadsafe(item.out.put_nowait, _ACCEPTED)
                except Exception as exc:  # surfaced to the waiting coroutine
                    item.loop.call_soon_threadsafe(item.out.put_nowait, exc)
            elif isinstance(item, _Call):
                try:
                    result = item.fn(self.engine)
                    item.loop.call_soon_threadsafe(_resolve, item.future, result, None)
                except Exception as exc:
                    item.loop.call_soon_threadsafe(_resolve, item.future, None, exc)
            elif isinstance(item, _Abort):
                self._outputs.pop(item.request_id, None)
                self.engine.abort_request(item.request_id)

    def _gather_burst(self) -> None:
        """Woken from idle with work: keep admitting until the inbox has been quiet for the
        scheduler's burst_gap_ms or burst_wait_ms has passed (see SchedulerConfig)."""
        sched = self.engine.config.scheduler
        if sched.burst_wait_ms <= 0:
            return
        deadline = time.monotonic() + sched.burst_wait_ms / 1000.0
        while (left := deadline - time.monotonic()) > 0:
            if not self._drain_inbox(block=True, timeout=min(sched.burst_gap_ms / 1000.0, left)):
                return

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                idle = not self.engine.has_unfinished
                changed = self._drain_inbox(block=idle)
                if idle and self.engine.has_unfinished:
                    self._gather_burst()
                if self.engine.has_unfinished:
                    deltas = self.engine.step()
                    t = self.engine.profiler.now()
                    self._dispatch(deltas)
                    self.engine.profiler.add("stream", t)
                    changed = True
                if changed and self.on_step is not None:
                    self.on_step(self.engine)
        except BaseException as exc:  # pragma: no cover - reported to every waiter
            logger.exception("engine thread died")
            self._error = exc
            for out, loop in self._outputs.values():
                loop.call_soon_threadsafe(out.put_nowait, EngineDeadError(str(exc)))

    def _dispatch(self, deltas: list[SequenceDelta]) -> None:
        by_request: dict[str, list[SequenceDelta]] = {}
        for d in deltas:
            by_request.setdefault(d.request_id, []).append(d)
        # One hand-over per event loop, not per request: each call_soon_threadsafe wakes the
        # loop through its self-pipe (a syscall), and the API serves every stream on one loop.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, list[SequenceDelta]]]] = {}
        for request_id, items in by_request.items():
            target = self._outputs.get(request_id)
            if target is None:
                continue
            if any(d.request_finished for d in items):
                self._outputs.pop(request_id, None)
            out, loop = target
            by_loop.setdefault(loop, []).append((out, items))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_deliver, batch)

    # ---- asyncio side ----------------------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(engine)` on the engine thread between steps and return its result."""
        if not self.is_healthy:
            raise EngineDeadError("engine is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(_Call(fn, future, loop))
        return await future

    async def open(self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None = None,
                   method: Any = None) -> AsyncIterator[list[SequenceDelta]]:
        """Submit a request and wait until the engine thread has accepted it; return its delta
        stream. A stream's HTTP status goes out before its first token, so whatever the engine
        refuses (an adapter unloaded a moment ago, say) must be known first: it raises
        RequestError here, and a 200 is never followed by a refusal. Closing the returned
        stream early aborts the request."""
        stream = self._generate(prompt_token_ids, params, adapter, None, method)
        await anext(stream)  # the acceptance marker
        return stream

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       adapter: str | None = None, request_id: str | None = None,
                       method: Any = None) -> AsyncIterator[list[SequenceDelta]]:
        """Yield each step's deltas for this request until every sequence finishes.

        Raises RequestError (bad request) or EngineDeadError.
        """
        stream = self._generate(prompt_token_ids, params, adapter, request_id, method)
        try:
            await anext(stream)  # the acceptance marker
            async for deltas in stream:
                yield deltas
        finally:
            await stream.aclose()

    async def _generate(self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None,
                        request_id: str | None, method: Any) -> AsyncIterator[list[SequenceDelta]]:
        """Yields the acceptance marker once, then each step's deltas."""
        if not self.is_healthy:
            raise EngineDeadError("engine is not running")
        request_id = request_id or uuid.uuid4().hex
        # Validate on the caller's side too, so a bad request never reaches the thread.
        self.engine.check_request(len(prompt_token_ids), params)
        out: asyncio.Queue = asyncio.Queue()
        self._inbox.put(_Add(request_id, prompt_token_ids, params, adapter, out, asyncio.get_running_loop(),
                             method))
        finished = False
        try:
            while not finished:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _ACCEPTED:
                    yield item
                    continue
                finished = any(d.request_finished for d in item)
                yield item
        finally:
            if not finished:
                self._inbox.put(_Abort(request_id))


_ACCEPTED: list = []  # posted (by identity) once the engine thread has added a request


def build_off_main_thread(build: Callable[[], Any]) -> Any:
    """Run `build` (the engine's construction) in a short-lived thread; return or re-raise.

    Why: once a process's main thread has run OpenMP work (loading and packing weights does),
    the parallel regions of every other thread, the engine loop's included, run about 2x slower
    (bench/thread_placement: 36 vs 73 ms per batch-1 step on an AMD EPYC; built off the main
    thread, 34 ms). So the server builds its engine here and keeps tensor work off its main thread.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = build()
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    worker = threading.Thread(target=target, name="alignserve-build")
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _resolve(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():  # the awaiting coroutine was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _deliver(batch: list[tuple[asyncio.Queue, list[SequenceDelta]]]) -> None:
    """On the event loop: one step's deltas into each request's stream queue."""
    for out, items in batch:
        out.put_nowait(items)


__all__ = ["AsyncEngine", "EngineDeadError", "RequestError", "build_off_main_thread"]
