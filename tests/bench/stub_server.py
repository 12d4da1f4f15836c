"""A tiny OpenAI-compatible streaming server with known timing, the ground truth for bench tests.

Each request streams `num_tokens` tokens: the first content chunk `ttft` seconds after arrival,
then one chunk every `tokens_per_chunk * itl` seconds, each carrying `tokens_per_chunk` tokens,
then a usage chunk and `[DONE]`. Chunks are sent on an absolute schedule so the delays do not
drift. Modes: `fail_every` (every k-th request answers 500) and `hang` (never answers).
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


@dataclass(frozen=True)
class StubConfig:
    """Timing and fault knobs of the stub."""

    ttft: float = 0.100
    itl: float = 0.020
    num_tokens: int = 10
    tokens_per_chunk: int = 1
    include_usage: bool = True
    fail_every: int = 0
    hang: bool = False


@dataclass
class StubLog:
    """What the stub saw (bodies in arrival order); written by the server thread."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    # perf_counter() stamps (same clock as the client: one process): arrival, each chunk sent.
    arrivals: list[float] = field(default_factory=list)
    sends: list[list[float]] = field(default_factory=list)


def make_app(cfg: StubConfig, log: StubLog) -> FastAPI:
    """The FastAPI app serving /v1/models, /v1/chat/completions and /v1/completions."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

    async def complete(request: Request, chat: bool) -> Response:
        arrived = time.perf_counter()
        body = await request.json()
        log.bodies.append(body)
        log.auth.append(request.headers.get("authorization"))
        log.arrivals.append(arrived)
        sends: list[float] = []
        log.sends.append(sends)
        if cfg.fail_every and len(log.bodies) % cfg.fail_every == 0:
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        if cfg.hang:
            await asyncio.sleep(3600)
        usage_on = (body.get("stream_options") or {}).get("include_usage") and cfg.include_usage

        def chunk(text: str | None, finish: str | None = None) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                if text == "":
                    delta = {"role": "assistant", "content": ""}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            return f"data: {json.dumps({'id': 'x', 'choices': [choice]})}\n\n"

        async def stream() -> AsyncIterator[str]:
            if chat:
                yield chunk("")  # role-only delta: must not count as the first token
            sent, step = 0, 0
            while sent < cfg.num_tokens:
                due = arrived + cfg.ttft + step * cfg.tokens_per_chunk * cfg.itl
                await asyncio.sleep(max(due - time.perf_counter(), 0.0))
                n = min(cfg.tokens_per_chunk, cfg.num_tokens - sent)
                sends.append(time.perf_counter())
                yield chunk("".join(f" tok{sent + i}" for i in range(n)))
                sent, step = sent + n, step + 1
            yield chunk(None, "length")
            if usage_on:
                usage = {"prompt_tokens": 7, "completion_tokens": cfg.num_tokens,
                         "total_tokens": 7 + cfg.num_tokens}
                yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    return app


@contextmanager
def stub_server(cfg: StubConfig) -> Iterator[tuple[str, StubLog]]:
    """Serve the stub on 127.0.0.1:<free port> in a thread; yields (base URL, log)."""
    log = StubLog()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(cfg, log), log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def closed_port() -> int:
    """A loopback port with nothing listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
