"""vLLM's utility routes: `POST /tokenize`, `POST /detokenize`, `GET /version`.

/tokenize takes a text prompt (`{"prompt": str}`, specials added as /v1/completions adds
them) or a chat (`{"messages": [...], "add_generation_prompt": bool}`, rendered exactly as
/v1/chat/completions renders it, tools included) and answers `{"count", "max_model_len",
"tokens"}`. /detokenize turns ids back into text (special tokens kept, as vLLM does, so a
chat prompt round-trips). Bodies are parsed strictly by `parse_body` (400 naming the field,
404 for an unknown `model`) and tokenized off the event loop. The API key is checked by
GuardMiddleware, as for every route but /health.
"""
from __future__ import annotations

import asyncio
import json
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from server.api import schemas
from server.api.errors import APIError
from server.api.protocol import STRICT, ChatMessage, parse_body
from server.api.tools import NamedToolChoice, ToolDef, ToolError, chat_messages, check_tools, render_chat, \
    template_renders_tools


class TokenizeCompletionRequest(BaseModel):
    model_config = STRICT

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(BaseModel):
    model_config = STRICT

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the template writes any BOS itself (vLLM's default too)
    tools: list[ToolDef] | None = None
    tool_choice: str | NamedToolChoice | None = None


class DetokenizeRequest(BaseModel):
    model_config = STRICT

    model: str | None = None
    tokens: list[int]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TokenizeResponse(_Open):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(_Open):
    prompt: str


class VersionResponse(_Open):
    version: str


REQUEST_MODELS = (TokenizeCompletionRequest, TokenizeChatRequest, DetokenizeRequest)
_REF = "#/components/schemas/{}"
TOKENIZE_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"anyOf": [
    {"$ref": _REF.format(m.__name__)} for m in (TokenizeCompletionRequest, TokenizeChatRequest)]}}}}}


def _version() -> str:
    try:
        return metadata.version("alignserve")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0.1.0"


def utility_router(serving) -> APIRouter:
    """Routes over `serving` (OpenAIServing: its tokenizer, model check and engine limits)."""
    router = APIRouter()
    tokenizer = serving.tokenizer
    max_model_len = serving.engine.engine.max_model_len
    version = _version()

    def tokenize(raw: bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None  # parse_body answers the 400
        chat = isinstance(data, dict) and "messages" in data
        body = parse_body(TokenizeChatRequest if chat else TokenizeCompletionRequest, raw)
        serving.check_model(body.model)
        if not chat:
            ids = tokenizer.hf.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}
        try:
            check_tools(body.tools, body.tool_choice)
            native = template_renders_tools(tokenizer.hf)
            ids = render_chat(tokenizer, body, chat_messages(body, native), native, body.add_special_tokens)
        except ToolError as exc:
            raise APIError(400, str(exc), exc.param) from exc
        except Exception as exc:  # the template's own errors (jinja raises its own types)
            raise APIError(400, f"cannot apply the chat template: {exc}", "messages") from exc
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}

    def detokenize(raw: bytes) -> dict[str, Any]:
        body = parse_body(DetokenizeRequest, raw)
        serving.check_model(body.model)
        vocab = len(tokenizer.hf)
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is not in the vocabulary [0, {vocab})", "tokens")
        return {"prompt": tokenizer.hf.decode(body.tokens, skip_special_tokens=False)}

    @router.post("/tokenize", openapi_extra=TOKENIZE_BODY,
                 responses=schemas.documented(TokenizeResponse, *schemas.COMMON, 400, 404, 413))
    async def tokenize_route(raw: Request) -> dict:
        return await asyncio.to_thread(tokenize, await raw.body())

    @router.post("/detokenize", openapi_extra=schemas.request_body(DetokenizeRequest),
                 responses=schemas.documented(DetokenizeResponse, *schemas.COMMON, 400, 404, 413))
    async def detokenize_route(raw: Request) -> dict:
        return await asyncio.to_thread(detokenize, await raw.body())

    @router.get("/version", responses=schemas.documented(VersionResponse, *schemas.COMMON))
    async def version_route() -> dict:
        return {"version": version}

    return router
