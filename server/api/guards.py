"""The HTTP front door: auth, body-size limit, drain state and in-flight accounting.

One pure ASGI middleware, ahead of routing and body parsing, so a request without the key
gets 401 whatever its body, an oversized body gets 413 before it is read into memory, and a
draining server answers 503 to anything new while it finishes what it started. It is pure
ASGI rather than starlette's BaseHTTPMiddleware, which would buffer streaming responses and
hide client disconnects from the app.
"""
from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from server.api.errors import BodyTooLarge, error_body

# Reachable without the key: liveness probes must not need a secret, and the playground's
# static page (no data in it) must load before it can ask for the key.
PUBLIC_PATHS = frozenset({"/health", "/", "/playground"})
PUBLIC_PREFIXES = ("/playground/assets/",)


@dataclass
class GuardState:
    """Shared between the middleware, the routes and the shutdown logic."""

    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    admission_paths: frozenset[str] = frozenset()  # generation routes, bounded by max_admitted
    max_admitted: int = 1 << 30
    metrics: Any = None  # server.engine.metrics.ServerMetrics
    draining: bool = False
    in_flight: int = 0  # HTTP requests inside the app, streaming ones until their last byte
    admitted: int = 0  # of those, generations
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


async def send_error(send, status: int, message: str, code: str | None = None,
                     headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, message, None, code)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _authorized(scope, api_key: str) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), api_key.encode())
    return False


class GuardMiddleware:
    """Auth (401), drain (503), body limit (413), in-flight count, for every HTTP request."""

    def __init__(self, app, state: GuardState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        path = scope.get("path", "")
        if state.draining:
            await send_error(send, 503, "the server is shutting down; retry on another replica",
                             "server_draining", {"Retry-After": "1", "Connection": "close"})
            return
        public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
        if state.api_key is not None and not public and not _authorized(scope, state.api_key):
            await send_error(send, 401, "Incorrect API key provided.", "invalid_api_key")
            return
        declared = _content_length(scope)
        if declared is not None and declared > state.max_body_bytes:
            await send_error(send, 413, BodyTooLarge(state.max_body_bytes).message, "request_too_large")
            return
        admit = path in state.admission_paths
        if admit and state.admitted >= state.max_admitted:
            if state.metrics is not None:
                state.metrics.rejected.labels("queue_full").inc()
            await send_error(send, 429, f"the server's queue is full ({state.max_admitted} requests admitted); "
                                        f"retry later", "queue_full", {"Retry-After": "1"})
            return
        started = False
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > state.max_body_bytes:
                    raise BodyTooLarge(state.max_body_bytes)
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        state.in_flight += 1
        state.admitted += admit
        self._publish()
        state.idle.clear()
        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge as exc:  # read outside a route (the app's handlers map it inside one)
            if not started:
                await send_error(send, 413, exc.message, exc.code)
        finally:
            state.in_flight -= 1
            state.admitted -= admit
            self._publish()
            if state.in_flight == 0:
                state.idle.set()

    def _publish(self) -> None:
        if self.state.metrics is not None:
            self.state.metrics.admitted.set(self.state.admitted)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

