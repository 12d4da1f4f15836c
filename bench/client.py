"""One streamed request against an OpenAI-compatible server, timed chunk by chunk.

In: an `httpx.AsyncClient`, the endpoint URL, a JSON body, a time budget.
Out: a `RequestRecord` (never an exception: every failure becomes an `error` type) plus the
reply text, which multi-turn sessions append to their history.
Does not: schedule requests or aggregate (see `bench.load`, `bench.metrics`).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from bench.metrics import RequestRecord, inter_token_latencies, split_tokens
from bench.tokens import TokenCounter


@dataclass(frozen=True)
class RequestSpec:
    """What to send and how to label it."""

    url: str
    body: dict[str, Any]
    headers: dict[str, str]
    prompt_text: str  # for prompt-token fallback counting
    input_len: int  # dataset's estimate, the last fallback
    index: int = 0
    session: int = 0
    turn: int = 0


class _StreamError(Exception):
    """A failure seen inside the SSE stream; `kind` becomes the record's error type."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def _chunk_text(obj: dict[str, Any]) -> str:
    """Content carried by one SSE chunk (chat delta, reasoning delta, or completion text)."""
    choices = obj.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):
        parts = (delta.get("content"), delta.get("reasoning_content"), delta.get("reasoning"))
        return "".join(p for p in parts if isinstance(p, str))
    text = choice.get("text")
    return text if isinstance(text, str) else ""


async def send_request(client: httpx.AsyncClient, spec: RequestSpec, timeout: float,
                       counter: TokenCounter, level_start: float) -> tuple[RequestRecord, str]:
    """Stream one request, bounded by `timeout` seconds in all; returns (record, reply text)."""
    chunk_times: list[float] = []
    chunk_texts: list[str] = []
    usage: dict[str, Any] = {}
    error: str | None = None
    detail: str | None = None
    start = time.perf_counter()
    try:
        async with asyncio.timeout(max(timeout, 0.0)):
            async with client.stream("POST", spec.url, json=spec.body, headers=spec.headers) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode("utf-8", "replace")
                    raise _StreamError(f"http_{resp.status_code}", body[:300])
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, `event:` lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        obj = json.loads(data)
                    except json.JSONDecodeError as exc:
                        raise _StreamError("protocol", f"bad SSE data: {data[:200]}") from exc
                    if not isinstance(obj, dict):
                        raise _StreamError("protocol", f"bad SSE data: {data[:200]}")
                    if obj.get("error"):
                        raise _StreamError("stream_error", json.dumps(obj["error"])[:300])
                    text = _chunk_text(obj)
                    if text:
                        chunk_times.append(time.perf_counter())
                        chunk_texts.append(text)
                    if isinstance(obj.get("usage"), dict):
                        usage = obj["usage"]
    except _StreamError as exc:
        error, detail = exc.kind, str(exc)
    except TimeoutError:
        error, detail = "timeout", f"no complete reply within {timeout:.1f}s"
    except httpx.TimeoutException as exc:
        error, detail = "timeout", repr(exc)
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
            httpx.CloseError) as exc:
        error, detail = "connection", repr(exc)[:300]
    except httpx.HTTPError as exc:
        error, detail = "http_client", repr(exc)[:300]
    except Exception as exc:  # noqa: BLE001 -- a server's misbehaviour is a result, not a crash
        error, detail = "client_error", repr(exc)[:300]
    end = time.perf_counter()
    if error is None and not chunk_texts:
        error, detail = "empty_output", "stream ended without content"
    return _record(spec, start, end, chunk_times, chunk_texts, usage, error, detail, counter,
                   level_start), "".join(chunk_texts)


def _record(spec: RequestSpec, start: float, end: float, chunk_times: list[float],
            chunk_texts: list[str], usage: dict[str, Any], error: str | None,
            detail: str | None, counter: TokenCounter, level_start: float) -> RequestRecord:
    """Token counts from usage, else the tokenizer / word count, else one per chunk."""
    reply = "".join(chunk_texts)
    out = usage.get("completion_tokens")
    if isinstance(out, int) and out > 0:
        output_tokens, source = out, "usage"
    elif counter.is_exact and reply:
        output_tokens, source = counter.count(reply), "tokenizer"
    else:
        output_tokens, source = len(chunk_texts), "chunks"
    prompt = usage.get("prompt_tokens")
    if not isinstance(prompt, int) or prompt <= 0:
        prompt = counter.count(spec.prompt_text) if counter.is_exact else spec.input_len
    # NOTE: chunk weights decide how a multi-token chunk's gap is split; a tokenizer knows
    # them, otherwise characters are the best proxy we have.
    weights = [counter.count(t) if counter.is_exact else len(t) for t in chunk_texts]
    itl = inter_token_latencies(chunk_times, split_tokens(weights, output_tokens))
    return RequestRecord(
        index=spec.index, session=spec.session, turn=spec.turn, start=start - level_start,
        e2e=end - start, ttft=(chunk_times[0] - start) if chunk_times else None,
        itl=tuple(itl), prompt_tokens=prompt, output_tokens=output_tokens if chunk_texts else 0,
        output_tokens_source=source, num_chunks=len(chunk_texts), error=error, error_detail=detail)


async def discover_model(client: httpx.AsyncClient, base_url: str, timeout: float) -> str | None:
    """First model id from `GET /models`, or None when the server cannot say."""
    try:
        async with asyncio.timeout(max(timeout, 0.0)):
            resp = await client.get(f"{base_url}/models")
            data = resp.json().get("data") or []
            return str(data[0]["id"]) if resp.status_code == 200 and data else None
    except (TimeoutError, httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return None
