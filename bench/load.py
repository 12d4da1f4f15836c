"""The load run: targets × levels, each level sending the same sessions, under one deadline.

In: a `LoadConfig`. Out: one `LevelResult` per (target, level), in run order.
A level runs either `concurrency` closed-loop clients (each takes the next session when its
previous one ends) or Poisson arrivals at `request_rate` (inf: all at once, optionally capped
by `max_concurrency`). Multi-turn sessions append the server's actual reply before the next turn.
NOTE: the whole run ends by `cfg.timeout`: every request gets at most the time left, and a
request that cannot start in time is counted `not_started`, so a hung server cannot hold us.
Does not: print tables or write files (see `bench.report`).
"""
from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
from tqdm import tqdm

from bench.client import RequestSpec, discover_model, send_request
from bench.config import Level, LoadConfig, Target
from bench.datasets import Message, Session, build_workload, render_prompt
from bench.metrics import RequestRecord, summarize
from bench.tokens import TokenCounter

# Past the deadline in-flight requests time out by themselves; this is the backstop.
_GRACE_S = 2.0
_MODEL_LOOKUP_S = 5.0


@dataclass(frozen=True)
class LevelResult:
    """Outcome of one (target, level)."""

    target: Target
    model: str
    level: Level
    records: tuple[RequestRecord, ...]
    duration: float
    num_not_started: int
    summary: dict[str, Any]


class _LevelRun:
    """Mutable state of one level, shared by its client coroutines and dropped with it."""

    def __init__(self, total: int, desc: str, show_progress: bool) -> None:
        self.records: list[RequestRecord] = []
        self.num_failed = 0
        self.not_started = 0
        self.next_index = 0
        self.bar = tqdm(total=total, desc=desc, disable=not show_progress, file=sys.stderr,
                        unit="req", dynamic_ncols=True)

    def take_index(self) -> int:
        self.next_index += 1
        return self.next_index - 1

    def add(self, record: RequestRecord) -> None:
        self.records.append(record)
        self.bar.update(1)
        if record.error is not None:
            self.num_failed += 1
            self.bar.set_postfix(errors=self.num_failed, refresh=False)


def _body(cfg: LoadConfig, model: str, messages: list[Message], max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens,
                            "temperature": cfg.temperature, "stream": True,
                            "stream_options": {"include_usage": True}}
    if cfg.endpoint == "chat":
        body["messages"] = messages
    else:
        body["prompt"] = render_prompt(messages)
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # vLLM / SGLang / llama.cpp extension: fixed output lengths
    return body


async def _run_session(client: httpx.AsyncClient, cfg: LoadConfig, url: str, model: str,
                       sid: int, session: Session, run: _LevelRun, counter: TokenCounter,
                       level_start: float, deadline: float) -> None:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    history: list[Message] = []
    history_len = 0
    request_timeout = cfg.request_timeout or cfg.timeout
    for tid, turn in enumerate(session.turns):
        left = deadline - time.perf_counter()
        if left <= 0:
            run.not_started += len(session.turns) - tid
            return
        messages = history + list(turn.messages)
        spec = RequestSpec(
            url=url, body=_body(cfg, model, messages, turn.max_tokens), headers=headers,
            prompt_text="\n".join(m["content"] for m in messages),
            input_len=history_len + turn.input_len, index=run.take_index(), session=sid, turn=tid)
        record, reply = await send_request(client, spec, min(request_timeout, left), counter,
                                           level_start)
        run.add(record)
        reply = reply if record.ok and reply else turn.fallback_reply
        history = messages + [{"role": "assistant", "content": reply}]
        history_len += turn.input_len + counter.count(reply)


async def run_level(client: httpx.AsyncClient, cfg: LoadConfig, target: Target, model: str,
                    level: Level, sessions: list[Session], counter: TokenCounter,
                    deadline: float, desc: str | None = None) -> LevelResult:
    """Send every turn of `sessions` to `target` at `level`; never raises for server faults."""
    total = sum(len(s.turns) for s in sessions)
    run = _LevelRun(total, desc or f"{target.name} {level.label}", cfg.progress)
    url = f"{target.base_url}/{'chat/completions' if cfg.endpoint == 'chat' else 'completions'}"
    start = time.perf_counter()

    async def one(sid: int, session: Session) -> None:
        await _run_session(client, cfg, url, model, sid, session, run, counter, start, deadline)

    async def closed_loop(queue: Iterator[tuple[int, Session]]) -> None:
        for sid, session in queue:  # NOTE: a shared iterator; next() never awaits, so no races
            await one(sid, session)

    async def open_loop(rate: float, cap: asyncio.Semaphore | None) -> None:
        rng = random.Random(cfg.prompts.seed)

        async def capped(sid: int, session: Session) -> None:
            if cap is None:
                return await one(sid, session)
            async with cap:
                await one(sid, session)

        tasks: list[asyncio.Task[None]] = []
        for sid, session in enumerate(sessions):
            if time.perf_counter() >= deadline:
                run.not_started += sum(len(s.turns) for s in sessions[sid:])
                break
            tasks.append(asyncio.create_task(capped(sid, session)))
            if not math.isinf(rate):
                gap = rng.expovariate(rate)
                await asyncio.sleep(min(gap, max(deadline - time.perf_counter(), 0.0)))
        await asyncio.gather(*tasks)

    if level.request_rate is not None:
        cap = asyncio.Semaphore(level.max_concurrency) if level.max_concurrency else None
        body = open_loop(level.request_rate, cap)
    else:
        queue = iter(enumerate(sessions))
        body = asyncio.gather(*(closed_loop(queue) for _ in range(level.concurrency or 1)))
    try:
        await asyncio.wait_for(body, max(deadline - time.perf_counter(), 0.0) + _GRACE_S)
    except TimeoutError:
        pass  # requests cut off by the backstop are counted below as not started
    duration = time.perf_counter() - start
    run.bar.close()
    lost = total - len(run.records) - run.not_started
    records = tuple(sorted(run.records, key=lambda r: r.index))
    summary = summarize(list(records), duration, run.not_started + lost,
                        cfg.slo_ttft_ms, cfg.slo_tpot_ms)
    return LevelResult(target, model, level, records, duration, run.not_started + lost, summary)


def _warmup_level(cfg: LoadConfig) -> Level:
    widest = max((lv.concurrency or lv.max_concurrency or cfg.warmup) for lv in cfg.levels)
    return Level(concurrency=max(1, min(cfg.warmup, widest)))


async def run_load(cfg: LoadConfig, counter: TokenCounter | None = None) -> list[LevelResult]:
    """Run every level against every target in turn; returns results in run order."""
    deadline = time.perf_counter() + cfg.timeout
    counter = counter if counter is not None else TokenCounter.load(cfg.tokenizer)
    sessions = build_workload(cfg.prompts, cfg.num_requests, counter)
    # NOTE: warm-up prompts differ from the measured ones so they cannot warm a prefix cache.
    warm = (build_workload(replace(cfg.prompts, seed=cfg.prompts.seed + 1), cfg.warmup, counter)
            if cfg.warmup else [])
    results: list[LevelResult] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    for target in cfg.targets:
        # trust_env=False: a proxy from the environment must not sit between us and the server.
        auth = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits,
                                     trust_env=False, headers=auth) as client:
            model = cfg.model
            if model is None:
                lookup_s = min(_MODEL_LOOKUP_S, max(deadline - time.perf_counter(), 0.0))
                model = await discover_model(client, target.base_url, lookup_s) or "default"
            if warm:
                await run_level(client, cfg, target, model, _warmup_level(cfg), warm, counter,
                                deadline, desc=f"{target.name} warmup")
            for level in cfg.levels:
                results.append(await run_level(client, cfg, target, model, level, sessions,
                                               counter, deadline))
    return results


def run_load_sync(cfg: LoadConfig, counter: TokenCounter | None = None) -> list[LevelResult]:
    """`run_load` from synchronous code (CLI, peers script, tests)."""
    return asyncio.run(run_load(cfg, counter))
