"""Translate OpenAI requests to engine calls and engine deltas to OpenAI responses/chunks.

`prepare` (parse, template, tokenize, check) runs in a worker thread, never on the event
loop. Each request has a deadline (`--request-timeout`): past it, it is aborted in the engine
and answered 504 (a stream gets an error event, since its status line has gone out).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from server.api.errors import APIError, error_body
from server.api.protocol import ChatCompletionRequest, CompletionRequest, new_id, now, parse_body, usage
from server.engine.async_engine import AsyncEngine, EngineDeadError
from server.engine.engine import RequestError
from server.engine.messages import SequenceDelta, TokenLogprob
from server.engine.metrics import ServerMetrics
from server.api.prompt_scores import echo_logprobs, join_logprobs, vllm_prompt_logprobs
from server.api.request_options import RequestOptions
from server.api.tools import ToolError, ToolReplies, chat_messages, render_chat, template_renders_tools
from server.methods.structured import Grammars, StructuredError


@dataclass
class Prepared:
    """A validated request ready for the engine."""

    kind: str  # "chat" | "completion"
    body: ChatCompletionRequest | CompletionRequest
    prompt_token_ids: list[int]
    model_name: str
    adapter: str | None = None
    response_id: str = field(default_factory=lambda: new_id("chatcmpl"))
    created: int = field(default_factory=now)
    method: Any = None  # the request's test-time method (server/methods), made once here
    # Prompt methods (RAG): they rewrote the prompt and annotate the response's `alignment`.
    annotators: list[Any] = field(default_factory=list)
    discard_output: bool = False  # max_tokens 0: the engine samples one token nobody sees
    tools: ToolReplies | None = None  # chat with tools in play: text -> content + tool_calls


class OpenAIServing(RequestOptions):
    """Shared logic of /v1/chat/completions and /v1/completions."""

    def __init__(self, engine: AsyncEngine, model_name: str, metrics: ServerMetrics,
                 request_timeout: float = 0.0, retrieval=None) -> None:
        self.engine = engine
        self.retrieval = retrieval  # retrieval.service.Retrieval, for `rag` and `knn_lm`
        self._fingerprints: tuple[str, str] | None = None  # base model, tokenizer (kNN-LM stores)
        self.model_name = model_name
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.request_timeout = request_timeout or None
        self.grammars = Grammars.for_engine(engine.engine)  # its compiler is built on first use

    def _deadline(self, started: float) -> float | None:
        return None if self.request_timeout is None else started + self.request_timeout

    def _timeout_message(self) -> str:
        return f"the request did not finish within the server's deadline of {self.request_timeout:g} s"

    def prepare(self, kind: str, raw: bytes):
        """(Prepared, SamplingParams) from a raw body; APIError for anything we cannot serve.
        Blocking: call it from a worker thread."""
        if kind == "chat":
            prep = self.prepare_chat(parse_body(ChatCompletionRequest, raw))
        else:
            prep = self.prepare_completion(parse_body(CompletionRequest, raw))
        return prep, self.sampling_params(prep)

    # ---- request side ------------------------------------------------------------------
    def check_model(self, name: str | None) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 if unknown."""
        if name is None or name == self.model_name:
            return None
        # NOTE: a read-only peek across threads; the engine thread re-resolves the name.
        if self.engine.engine.adapters.get(name) is not None:
            return name
        raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def prepare_chat(self, body: ChatCompletionRequest) -> Prepared:
        adapter = self.check_model(body.model)
        native = template_renders_tools(self.tokenizer.hf)
        try:
            messages = chat_messages(body, native)  # tool definitions, calls and results included
        except ToolError as exc:
            raise APIError(400, f"cannot apply the chat template: {exc}", exc.param) from exc
        users = [m.text() for m in body.messages if m.role == "user"]
        if body.rag is not None and not users:
            raise APIError(400, "rag retrieves for the last user message; the conversation has none", "rag")
        rag = self._rag(body, users[-1] if users else "")
        if rag is not None:
            messages = rag.rewrite_chat(messages)
        try:
            ids = render_chat(self.tokenizer, body, messages, native)
        except (ValueError, TypeError) as exc:
            raise APIError(400, f"cannot apply the chat template: {exc}", "messages") from exc
        return Prepared("chat", body, ids, body.model or self.model_name, adapter,
                        annotators=[rag] if rag is not None else [], tools=ToolReplies.for_request(body))

    def prepare_completion(self, body: CompletionRequest) -> Prepared:
        adapter = self.check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        rag = None
        if body.rag is not None and not isinstance(prompt, str):
            raise APIError(400, "rag needs a text prompt to retrieve for, not token ids", "rag")
        if isinstance(prompt, str):
            rag = self._rag(body, prompt)
            ids = self.tokenizer.encode(rag.rewrite_completion(prompt) if rag is not None else prompt)
        else:
            vocab = self.engine.engine.model_config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
            ids = list(prompt)
        return Prepared("completion", body, ids, body.model or self.model_name, adapter, new_id("cmpl"),
                        annotators=[rag] if rag is not None else [])

    def sampling_params(self, prep: Prepared):
        body = prep.body
        max_len = self.engine.engine.max_model_len
        num_prompt = len(prep.prompt_token_ids)
        max_tokens = body.requested_max_tokens()
        if max_tokens is None:
            max_tokens = max_len - num_prompt
            if max_tokens < 1:
                raise APIError(400, f"This model's maximum context length is {max_len} tokens, and the "
                                    f"prompt has {num_prompt} tokens.", "messages")
        if max_tokens == 0:  # (completions with echo) score the prompt only
            max_tokens, prep.discard_output = 1, True
        params = body.to_sampling_params(max_tokens, body.requested_logprobs())
        echo = getattr(body, "echo", False)
        if body.prompt_logprobs is not None or (echo and params.logprobs is not None):
            top = body.prompt_logprobs if body.prompt_logprobs is not None else params.logprobs
            params = dataclasses.replace(params, prompt_logprobs=top)
        for annotator in prep.annotators:
            constraint = annotator.constraint(self.tokenizer, self.engine.engine.eos_token_ids)
            if constraint is not None:
                params = dataclasses.replace(params, constraint=constraint)
        params = dataclasses.replace(params, logit_rules=self._logit_rules(body, params))
        try:  # the grammar compiles here, in the preparing thread (protocol refused rag extractive)
            spec = body.grammar_spec()
            params = dataclasses.replace(params, constraint=self.grammars.constraint(spec)) if spec else params
        except StructuredError as exc:
            raise APIError(400, str(exc), exc.param) from exc
        self.check_methods(body)
        prep.method = body.method(self._reward_renderer(prep), self.tokenizer.hf.pad_token_id, self._question(prep))
        if body.knn_lm is not None:
            prep.method = self._knn_lm(body, prep)
        try:
            streams = prep.method.streams_per_output if prep.method is not None else 1
            self.engine.engine.check_request(num_prompt, params, streams)
        except RequestError as exc:
            raise APIError(400, str(exc), exc.param) from exc
        return params

    def _chat_logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        def entry(token_id: int, lp: float) -> dict[str, Any]:
            s = self.tokenizer.token_str(token_id)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {"content": [{**entry(x.token_id, x.logprob),
                             "top_logprobs": [entry(t, v) for t, v in x.top]} for x in lps]}

    def _completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens = [self.tokenizer.token_str(x.token_id) for x in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
                "top_logprobs": [{self.tokenizer.token_str(t): v for t, v in x.top} for x in lps],
                "text_offset": offsets}

    def _choice_chunk(self, prep: Prepared, d: SequenceDelta, first: bool, text_offset: int) -> dict[str, Any]:
        if prep.kind == "chat":
            delta: dict[str, Any] = {"content": d.text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": d.index, "delta": delta,
                      "logprobs": self._chat_logprobs(d.logprobs) if d.logprobs else None,
                      "finish_reason": d.finish_reason}
            return prep.tools.stream_choice(choice) if prep.tools is not None else choice
        return {"index": d.index, "text": d.text,
                "logprobs": self._completion_logprobs(d.logprobs, text_offset) if d.logprobs else None,
                "finish_reason": d.finish_reason}

    async def open_stream(self, prep: Prepared, params) -> AsyncIterator:
        """The engine's delta stream for `prep`, once the engine accepted it (4xx otherwise)."""
        try:
            return await self.engine.open(prep.prompt_token_ids, params, prep.adapter, method=prep.method)
        except RequestError as exc:
            raise APIError(exc.status, str(exc), exc.param) from exc
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from exc

    async def stream(self, prep: Prepared, params, source: AsyncIterator) -> AsyncIterator[str]:
        """SSE body over an opened `source`: one chunk per sequence delta, optional usage
        chunk, then [DONE]."""
        obj = "chat.completion.chunk" if prep.kind == "chat" else "text_completion"
        include_usage = bool(prep.body.stream_options and prep.body.stream_options.include_usage)
        started = time.monotonic()
        last = None
        sent_first: set[int] = set()
        text_offsets: dict[int, int] = {}
        texts: dict[int, str] = {}
        num_output = 0
        num_prompt = len(prep.prompt_token_ids)
        endpoint = prep.kind
        try:
            async for deltas in until_deadline(source, self._deadline(started)):
                deltas = merge_by_index(deltas)
                t = time.monotonic()
                if last is None:
                    self.metrics.ttft.observe(t - started)
                else:
                    self.metrics.itl.observe(t - last)
                last = t
                choices = []
                for d in deltas:
                    num_output += len(d.new_token_ids)
                    first = d.index not in sent_first
                    if d.text or d.finish_reason or d.logprobs or (first and prep.kind == "chat"):
                        choice = self._choice_chunk(prep, d, first, text_offsets.get(d.index, 0))
                        if choice is not None:  # None: a tool parser holds all of it back
                            choices.append(choice)
                        sent_first.add(d.index)
                        text_offsets[d.index] = text_offsets.get(d.index, 0) + len(d.text)
                alignment = {k: v for d in deltas if d.extra for k, v in d.extra.get("alignment", {}).items()}
                for d in deltas:
                    texts[d.index] = texts.get(d.index, "") + d.text
                if prep.annotators and any(d.request_finished for d in deltas):
                    alignment.update({a.name: a.report(texts) for a in prep.annotators})
                num_output = next((d.extra["num_generated_tokens"] for d in deltas
                                   if d.extra and "num_generated_tokens" in d.extra), num_output)
                if choices:
                    chunk = {"id": prep.response_id, "object": obj, "created": prep.created,
                             "model": prep.model_name, "choices": choices}
                    if alignment:
                        chunk["alignment"] = alignment
                    if include_usage:
                        chunk["usage"] = None
                    yield f"data: {json.dumps(chunk)}\n\n"
            if include_usage:
                chunk = {"id": prep.response_id, "object": obj, "created": prep.created,
                         "model": prep.model_name, "choices": [], "usage": usage(num_prompt, num_output)}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
            self._count(endpoint, "ok", started, prep.adapter)
        except (RequestError, EngineDeadError) as exc:
            status = exc.status if isinstance(exc, RequestError) else 503
            self.metrics.requests.labels(endpoint, "error").inc()
            yield f"data: {json.dumps(error_body(status, str(exc)))}\n\n"
        except TimeoutError:
            self.metrics.timeouts.labels(endpoint).inc()
            self.metrics.requests.labels(endpoint, "timeout").inc()
            yield f"data: {json.dumps(error_body(504, self._timeout_message(), None, 'deadline_exceeded'))}\n\n"
        except asyncio.CancelledError:
            self.metrics.requests.labels(endpoint, "aborted").inc()
            raise

    async def complete(self, prep: Prepared, params, raw: Request) -> dict[str, Any]:
        """Non-streaming: gather all deltas; abort if the client disconnects meanwhile."""
        started = time.monotonic()
        deadline = self._deadline(started)
        task = asyncio.create_task(self._collect(prep, params, started))
        while not task.done():
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            done, _ = await asyncio.wait({task}, timeout=wait)
            if done:
                break
            if deadline is not None and time.monotonic() >= deadline:
                task.cancel()
                self.metrics.timeouts.labels(prep.kind).inc()
                self.metrics.requests.labels(prep.kind, "timeout").inc()
                raise APIError(504, self._timeout_message(), None, "deadline_exceeded")
            if await raw.is_disconnected():
                task.cancel()
                self.metrics.requests.labels(prep.kind, "aborted").inc()
                raise APIError(499, "client disconnected")
        try:
            return task.result()
        except RequestError as exc:
            raise APIError(exc.status, str(exc), exc.param) from exc
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from exc

    async def _collect(self, prep: Prepared, params, started: float) -> dict[str, Any]:
        want_lp = params.logprobs is not None
        texts: dict[int, str] = {}
        finish: dict[int, str | None] = {}
        lps: dict[int, list[TokenLogprob]] = {}
        num_output, alignment = 0, {}
        prompt_scores = None
        async for deltas in self.engine.generate(prep.prompt_token_ids, params, prep.adapter, method=prep.method):
            if num_output == 0 and any(d.new_token_ids for d in deltas):
                self.metrics.ttft.observe(time.monotonic() - started)
            for d in deltas:
                texts[d.index] = texts.get(d.index, "") + d.text
                lps.setdefault(d.index, []).extend(d.logprobs or [])
                num_output += len(d.new_token_ids)
                if d.finish_reason:
                    finish[d.index] = d.finish_reason
                if d.extra:
                    alignment.update(d.extra.get("alignment", {}))
                    num_output = d.extra.get("num_generated_tokens", num_output)
                    prompt_scores = d.extra.get("prompt_logprobs", prompt_scores)
        if prep.discard_output:
            texts, lps, num_output = {}, {}, 0
        indices = range(params.n)
        if prep.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": texts.get(i, "")},
                        "logprobs": self._chat_logprobs(lps.get(i, [])) if want_lp else None,
                        "finish_reason": finish.get(i)} for i in indices]
            for c in choices if prep.tools is not None else ():
                prep.tools.finish_choice(c)
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": texts.get(i, ""),
                        "logprobs": self._completion_logprobs(lps.get(i, []), 0) if want_lp else None,
                        "finish_reason": finish.get(i) or ("length" if prep.discard_output else None)}
                       for i in indices]
            if prep.body.echo:
                self._echo(prep, choices, prompt_scores)
            obj = "text_completion"
        if prep.body.prompt_logprobs is not None and prompt_scores is not None:
            for c in choices:
                c["prompt_logprobs"] = vllm_prompt_logprobs(self.tokenizer, prompt_scores)
        num_prompt = len(prep.prompt_token_ids)
        alignment.update({a.name: a.report({i: texts.get(i, "") for i in indices}) for a in prep.annotators})
        self._count(prep.kind, "ok", started, prep.adapter)
        response = {"id": prep.response_id, "object": obj, "created": prep.created, "model": prep.model_name,
                    "choices": choices, "usage": usage(num_prompt, num_output)}
        if alignment:
            response["alignment"] = alignment
        return response

    def _echo(self, prep: Prepared, choices: list[dict[str, Any]], scores) -> None:
        """OpenAI's legacy echo: the prompt's text (and logprobs) before each completion's."""
        prompt = prep.body.prompt if isinstance(prep.body.prompt, str) else self.tokenizer.decode(prep.prompt_token_ids)
        for c in choices:
            if c["logprobs"] is not None and scores is not None:
                part = echo_logprobs(self.tokenizer, prep.prompt_token_ids, scores)
                c["logprobs"] = join_logprobs(part, c["logprobs"] if c["text"] else None, len(prompt))
            c["text"] = prompt + c["text"]

    def _count(self, endpoint: str, status: str, started: float, adapter: str | None = None) -> None:
        """Request outcome metrics; token counts come from the engine (server.engine.metrics)."""
        self.metrics.requests.labels(endpoint, status).inc()
        self.metrics.model_requests.labels(adapter or self.model_name).inc()
        self.metrics.e2e.observe(time.monotonic() - started)


async def until_deadline(source: AsyncIterator, deadline: float | None) -> AsyncIterator:
    """Items of `source` until `deadline` (time.monotonic()); then close `source` (which aborts
    its engine request) and raise TimeoutError. A deadline around each wait, not around the
    consumer's loop body, so time spent sending to a slow client is never cut mid-write."""
    try:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            try:
                item = await asyncio.wait_for(anext(source), remaining)
            except StopAsyncIteration:
                return
            yield item
    finally:
        await source.aclose()


def merge_by_index(deltas: list[SequenceDelta]) -> list[SequenceDelta]:
    """One delta per output index: a search may commit twice to an output in one step, and a
    chunk carries at most one choice per index."""
    merged: dict[int, SequenceDelta] = {}
    for d in deltas:
        m = merged.get(d.index)
        if m is None:
            merged[d.index] = dataclasses.replace(d, new_token_ids=list(d.new_token_ids),
                                                  logprobs=list(d.logprobs) if d.logprobs else None)
            continue
        m.new_token_ids += d.new_token_ids
        m.text += d.text
        if d.logprobs:
            m.logprobs = (m.logprobs or []) + list(d.logprobs)
        m.finish_reason = d.finish_reason or m.finish_reason
        m.num_output_tokens = d.num_output_tokens
        m.request_finished = m.request_finished or d.request_finished
        if d.extra:
            m.extra = {**(m.extra or {}), **d.extra}
    return list(merged.values())
