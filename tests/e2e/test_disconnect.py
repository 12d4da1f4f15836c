"""Clients that go away mid-request free their KV blocks; the server keeps serving.

Each cut happens after an observable event (a first chunk, a request seen running), never
after a guessed time, and each cut request asks for far more tokens than it can make before
the cut, so the `ok` count proves it was aborted, not finished (see tests/e2e/probes.py).
"""
from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.e2e.probes import (CUT_MAX_TOKENS, gauge, open_request, requests_counted, wait_until,
                              wait_until_idle)

pytestmark = pytest.mark.e2e


async def cut_stream(client: httpx.AsyncClient, server, i: int) -> int:
    body = {"model": "SmolLM2-135M-Instruct", "stream": True, "max_tokens": CUT_MAX_TOKENS, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Story number {i}: tell me a long story."}]}
    chunks = 0
    async with client.stream("POST", server.base_url + "/v1/chat/completions", json=body,
                             headers=server.headers()) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                chunks += 1
                break  # leaving the context closes the connection mid-stream
    return chunks


def test_fifty_cut_streams_free_their_blocks(server):
    ok_before = requests_counted(server, "chat", "ok")

    async def main() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            sem = asyncio.Semaphore(10)

            async def one(i: int) -> int:
                async with sem:
                    return await cut_stream(client, server, i)
            return await asyncio.gather(*(one(i) for i in range(50)))

    counts = asyncio.run(main())
    assert counts == [1] * 50
    wait_until_idle(server)
    assert requests_counted(server, "chat", "ok") == ok_before, "a cut stream ran to its end"
    r = httpx.post(server.base_url + "/v1/chat/completions", headers=server.headers(), timeout=60,
                   json={"messages": [{"role": "user", "content": "After the storm"}], "max_tokens": 3,
                         "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert requests_counted(server, "chat", "ok") == ok_before + 1  # the count above is live


def test_non_streaming_disconnect_aborts(server):
    wait_until_idle(server)  # so "running" below can only be this request
    ok_before = requests_counted(server, "chat", "ok")
    aborted_before = requests_counted(server, "chat", "aborted")
    body = {"model": "SmolLM2-135M-Instruct", "max_tokens": CUT_MAX_TOKENS, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Write a very long essay."}]}
    sock = open_request(server, "/v1/chat/completions", body)
    try:
        wait_until(lambda: gauge(server, "alignserve_num_requests_running") >= 1, "running")
    finally:
        sock.close()
    wait_until(lambda: requests_counted(server, "chat", "aborted") == aborted_before + 1, "counted as aborted")
    wait_until_idle(server)
    assert requests_counted(server, "chat", "ok") == ok_before, "the cut request ran to its end"
