"""The vLLM server seen as our engine: token ids in, `SequenceDelta` lists out, over loopback HTTP.

In: prompt token ids we rendered (chat template, RAG passages) and a `VLLMRequest` (our
validated `SamplingParams` plus the fields vLLM applies itself: logit_bias, allowed_token_ids,
bad_words, structured_outputs). Out: the same async iterator of `SequenceDelta` lists that
`AsyncEngine.generate` yields, so `OpenAIServing`'s response and stream builders run unchanged.
Every call is a streamed `/v1/completions` with `return_token_ids` (and token ids in logprobs),
so token counts, logprobs and parity checks see ids, never re-tokenized text. Closing a
stream early closes its HTTP connection, which makes vLLM abort the request.
Also the LoRA and health calls. Does not: validate requests (vllm_backend.py).
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from server.api.errors import APIError
from server.engine.async_engine import EngineDeadError
from server.engine.engine import RequestError
from server.engine.messages import SequenceDelta, TokenLogprob
from server.engine.sequence import SamplingParams

TOKEN_ID_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids spelling


@dataclass(frozen=True)
class VLLMRequest:
    """What one request asks of vLLM: our sampling params + fields passed through as is."""

    params: SamplingParams
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.params.n

    @property
    def logprobs(self) -> int | None:
        return self.params.logprobs


def completion_body(model: str, prompt_token_ids: list[int], request: VLLMRequest) -> dict[str, Any]:
    """vLLM's /v1/completions body for our params (streamed, token ids returned)."""
    p = request.params
    body: dict[str, Any] = {
        "model": model, "prompt": list(prompt_token_ids), "stream": True, "return_token_ids": True,
        "n": p.n, "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
        "top_k": p.top_k, "min_p": p.min_p, "seed": p.seed, "stop": list(p.stop),
        "stop_token_ids": list(p.stop_token_ids), "ignore_eos": p.ignore_eos, "min_tokens": p.min_tokens,
        "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
        "repetition_penalty": p.repetition_penalty, "skip_special_tokens": p.skip_special_tokens,
    }
    if p.logprobs is not None:
        body.update(logprobs=p.logprobs, return_tokens_as_token_ids=True)
    body.update(request.extra)
    return body


def _token_id(token: str) -> int:
    if not token.startswith(TOKEN_ID_PREFIX):
        raise ValueError(f"vLLM returned a token without its id: {token!r}")
    return int(token[len(TOKEN_ID_PREFIX):])


def parse_logprobs(raw: dict[str, Any] | None, k: int | None) -> list[TokenLogprob] | None:
    """vLLM's completion logprobs (tokens as `token_id:N`) as our TokenLogprob list; `top`
    keeps the k likeliest (vLLM adds the sampled token to the top-k when it is not among them)."""
    if raw is None or k is None:
        return None
    out = []
    for token, lp, top in zip(raw["tokens"], raw["token_logprobs"], raw.get("top_logprobs") or []):
        ranked = sorted(((_token_id(t), v) for t, v in (top or {}).items()), key=lambda x: -x[1])
        out.append(TokenLogprob(_token_id(token), lp, ranked[:k]))
    return out


def error_message(response_json: Any, fallback: str) -> tuple[str, str | None]:
    """(message, param) of an OpenAI-shaped error body, or `fallback`."""
    err = response_json.get("error") if isinstance(response_json, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or fallback), err.get("param")
    return fallback, None


class VLLMClient:
    """Talks to one vLLM server on loopback (`base_url`) that serves `served_name`."""

    def __init__(self, base_url: str, served_name: str, timeout: float | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.served_name = served_name
        # NOTE: no proxies from the environment: vLLM listens on loopback only. `transport`:
        # where tests stand in a recorded vLLM.
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=httpx.Timeout(timeout, connect=5.0),
                                      trust_env=False, transport=transport)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def healthy(self) -> bool:
        try:
            return (await self.http.get("/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """A plain POST; 503 when vLLM cannot be reached."""
        try:
            return await self.http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise APIError(503, f"the vLLM engine is unreachable: {type(exc).__name__}") from exc

    async def open(self, prompt_token_ids: list[int], request: VLLMRequest, adapter: str | None = None,
                   method: Any = None) -> AsyncIterator[list[SequenceDelta]]:
        """Send the request and wait for vLLM's status: a refusal is an APIError here, before
        our own status line goes out (as AsyncEngine.open). Returns the delta stream."""
        if method is not None:
            raise APIError(400, f"{method.name} is not served by the vllm backend", None, "unsupported_by_backend")
        body = completion_body(adapter or self.served_name, prompt_token_ids, request)
        try:
            response = await self.http.send(self.http.build_request("POST", "/v1/completions", json=body),
                                            stream=True)
        except httpx.HTTPError as exc:
            raise APIError(503, f"the vLLM engine is unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raw = await response.aread()
            await response.aclose()
            try:
                message, param = error_message(json.loads(raw), raw.decode("utf-8", "replace"))
            except ValueError:
                message, param = raw.decode("utf-8", "replace"), None
            raise APIError(response.status_code, f"vLLM: {message}", param)
        return self._deltas(response, len(prompt_token_ids), request)

    async def generate(self, prompt_token_ids: list[int], request: VLLMRequest, adapter: str | None = None,
                       method: Any = None) -> AsyncIterator[list[SequenceDelta]]:
        """Open, then yield the deltas (AsyncEngine.generate's contract)."""
        stream = await self.open(prompt_token_ids, request, adapter, method)
        try:
            async for deltas in stream:
                yield deltas
        finally:
            await stream.aclose()

    async def _deltas(self, response: httpx.Response, num_prompt: int,
                      request: VLLMRequest) -> AsyncIterator[list[SequenceDelta]]:
        counts: dict[int, int] = {}
        finished: set[int] = set()
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data.strip() == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    message, param = error_message(chunk, "vLLM failed the request")
                    code = chunk["error"].get("code")
                    raise RequestError(f"vLLM: {message}", param, code if isinstance(code, int) else 500)
                deltas = []
                for choice in chunk.get("choices") or []:
                    index = choice["index"]
                    ids = choice.get("token_ids") or []
                    counts[index] = counts.get(index, 0) + len(ids)
                    if choice.get("finish_reason"):
                        finished.add(index)
                    deltas.append(SequenceDelta(
                        chunk.get("id", ""), index, ids, choice.get("text") or "",
                        parse_logprobs(choice.get("logprobs"), request.logprobs), choice.get("finish_reason"),
                        num_prompt, counts[index], request_finished=len(finished) == request.n))
                if deltas:
                    yield deltas
        except httpx.HTTPError as exc:
            raise EngineDeadError(f"the vLLM engine dropped the stream: {type(exc).__name__}") from exc
        finally:
            await response.aclose()
