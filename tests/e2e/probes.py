"""Timing-free probes of a running server for disconnect tests: /metrics reads, bounded polls,
and raw HTTP requests whose connection the test closes at a moment of its choosing.

NOTE: nothing here assumes how fast the server generates. A test waits for an observable
state (a request running, a first chunk, every block free) under a deadline that only bounds
a failure, and a cut request asks for far more tokens than it can produce before the cut.
"""
from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

# Long enough to outlive the disconnect check (the server polls every 0.5 s) by orders of
# magnitude on any machine; the servers here allow 1024 tokens of prompt + output.
CUT_MAX_TOKENS = 900
DEADLINE_S = 60.0  # bounds a failing wait only; a passing one returns as soon as it can


def metrics(srv) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics as {(name, labels): value}."""
    text = httpx.get(srv.base_url + "/metrics", headers=srv.headers(), timeout=DEADLINE_S).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def gauge(srv, name: str) -> float:
    return metrics(srv)[(name, frozenset())]


def requests_counted(srv, endpoint: str, status: str) -> float:
    """alignserve_requests_total for one endpoint and outcome (0 before the first)."""
    labels = frozenset({"endpoint": endpoint, "status": status}.items())
    return metrics(srv).get(("alignserve_requests_total", labels), 0.0)


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll `predicate` until true; fail after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, f"not {what} after {DEADLINE_S:.0f} s"
        time.sleep(0.05)


def wait_until_idle(srv) -> None:
    """Every KV block free and no sequence running."""
    wait_until(lambda: gauge(srv, "alignserve_kv_cache_used_blocks") == 0
               and gauge(srv, "alignserve_num_requests_running") == 0, "idle (blocks free, nothing running)")


def open_request(srv, path: str, body: dict) -> socket.socket:
    """Send a POST on a raw socket and return it unread: closing it is the client going away."""
    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(payload)}"]
    head += [f"{k}: {v}" for k, v in srv.headers().items()]
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE_S)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    return sock


def read_first_chunk(sock: socket.socket) -> bytes:
    """Read an SSE response on `sock` up to its first `data:` event (status 200 checked)."""
    received = b""
    while b"\ndata: " not in received and not received.startswith(b"data: "):
        part = sock.recv(65536)
        assert part, f"connection closed before the first chunk: {received[:500]!r}"
        received += part
        assert received.startswith(b"HTTP/1.1 200"), received[:500]
    return received
