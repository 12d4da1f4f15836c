"""Clients that go away mid-stream free their KV blocks; the server keeps serving."""
from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

pytestmark = pytest.mark.e2e


def used_blocks(server) -> float:
    text = httpx.get(server.base_url + "/metrics", headers=server.headers()).text
    return float(re.search(r"^alignserve_kv_cache_used_blocks (\S+)$", text, re.M).group(1))


async def cut_stream(client: httpx.AsyncClient, server, i: int) -> int:
    body = {"model": "SmolLM2-135M-Instruct", "stream": True, "max_tokens": 200, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Story number {i}: tell me a long story."}]}
    chunks = 0
    async with client.stream("POST", server.base_url + "/v1/chat/completions", json=body,
                             headers=server.headers()) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                chunks += 1
            if chunks >= 3:
                break  # leaving the context closes the connection mid-stream
    return chunks


def test_fifty_cut_streams_free_their_blocks(server):
    async def main() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            sem = asyncio.Semaphore(10)

            async def one(i: int) -> int:
                async with sem:
                    return await cut_stream(client, server, i)
            return await asyncio.gather(*(one(i) for i in range(50)))

    counts = asyncio.run(main())
    assert all(c >= 3 for c in counts)
    deadline = time.monotonic() + 30
    while used_blocks(server) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert used_blocks(server) == 0
    r = httpx.post(server.base_url + "/v1/completions", headers=server.headers(),
                   json={"prompt": "After the storm", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_non_streaming_client_timeout_aborts(server):
    body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 400, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Write a very long essay."}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=server.headers(), timeout=1.5)
    deadline = time.monotonic() + 30
    while used_blocks(server) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert used_blocks(server) == 0
