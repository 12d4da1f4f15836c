"""A scripted stand-in for a remote OpenAI-compatible server (httpx2 transport for the `openai`
client): records every request body and answers from per-endpoint scripts.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx2


class FakeOpenAI:
    """`chat(body) -> list[(content, finish_reason)]`, `complete(body) -> str`."""

    def __init__(self, chat: Callable[[dict[str, Any]], list[tuple[str, str]]] | None = None,
                 complete: Callable[[dict[str, Any]], str] | None = None, reject_n: bool = False,
                 model: str = "fake-model"):
        self.chat, self.complete, self.reject_n, self.model = chat, complete, reject_n, model
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def client(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(transport=httpx2.MockTransport(self.handle))

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        self.requests.append((path, body))
        if path.endswith("/models"):
            return httpx2.Response(200, json={"object": "list", "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "test"}]})
        if path.endswith("/chat/completions"):
            if self.reject_n and body.get("n", 1) > 1:
                return httpx2.Response(400, json={"error": {"message": "n>1 unsupported", "type": "invalid"}})
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                       for i, (text, finish) in enumerate(self.chat(body))]
            return httpx2.Response(200, json={"id": "c", "object": "chat.completion", "created": 0,
                                              "model": body["model"], "choices": choices})
        if path.endswith("/completions"):
            return httpx2.Response(200, json={"id": "t", "object": "text_completion", "created": 0,
                                              "model": body["model"], "choices": [
                                                  {"index": 0, "text": self.complete(body), "finish_reason": "stop",
                                                   "logprobs": None}]})
        return httpx2.Response(404, json={"error": {"message": "not found"}})
