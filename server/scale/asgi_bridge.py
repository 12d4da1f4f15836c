"""Carry one HTTP request to our FastAPI app as plain data, and merge replicas' /metrics.

Each replica runs the whole single-server app (server/api/app.py), so every route, method and
extension field behaves as on one server. The ingress turns the incoming request into a
picklable `HttpRequest`; the replica runs the app on it through ASGI and yields a `start`
dict (status, headers) followed by body chunks, which crosses Ray as a streaming call, SSE
included. `merge_metrics` joins the replicas' Prometheus texts into one exposition with a
`replica` label on every sample. No Ray here.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString


@dataclass(frozen=True)
class HttpRequest:
    """An HTTP request as data: what the ingress read from the client."""

    method: str
    path: str
    query_string: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    client: tuple[str, int] = ("127.0.0.1", 0)

    def with_path(self, method: str, path: str, body: bytes = b"") -> HttpRequest:
        """The same client (headers, auth) asking for another route."""
        headers = tuple((k, v) for k, v in self.headers if k.lower() not in (b"content-length",))
        return HttpRequest(method, path, b"", headers + ((b"content-length", str(len(body)).encode()),), body,
                           self.client)


async def call_asgi(app, request: HttpRequest) -> AsyncIterator[dict | bytes]:
    """Run `app` on `request`: yields {"status", "headers"} first, then body chunks (bytes).

    Closing the iterator early (the client went away) tells the app the client disconnected,
    so our streaming responses abort their engine requests as on one server.
    """
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
             "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "root_path": "",
             "query_string": request.query_string, "headers": [(k.lower(), v) for k, v in request.headers],
             "client": request.client, "server": ("127.0.0.1", 80)}
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await messages.put(None)  # NOTE: the app returned (or raised): no more messages

    task = asyncio.create_task(run())
    try:
        while True:
            message = await messages.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": [(bytes(k), bytes(v)) for k, v in
                                                                 message.get("headers", [])]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
    finally:
        disconnected.set()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=30)
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()


async def read_all(chunks: AsyncIterator[dict | bytes]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Collect a `call_asgi` stream: (status, headers, body)."""
    status, headers, body = 500, [], bytearray()
    async for item in chunks:
        if isinstance(item, dict):
            status, headers = item["status"], item["headers"]
        else:
            body += item
    return status, headers, bytes(body)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def merge_metrics(texts: dict[str, str], label: str = "replica") -> str:
    """One Prometheus text exposition from several: every sample gains `label="<key>"`.

    Families keep one HELP/TYPE header and all their samples together (the format requires
    it), replicas in the order given.
    """
    families: dict[str, tuple[str, str, list[str]]] = {}
    for replica, text in texts.items():
        for family in text_string_to_metric_families(text):
            _, _, lines = families.setdefault(family.name, (family.documentation, family.type, []))
            for sample in family.samples:
                labels = {label: replica, **sample.labels}
                rendered = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
                lines.append(f"{sample.name}{{{rendered}}} {floatToGoString(sample.value)}")
    out = []
    for name, (doc, kind, lines) in families.items():
        out.append(f"# HELP {name} {doc.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n"
