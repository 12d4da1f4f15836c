"""Response shapes for the OpenAPI document, and each route's documented responses.

The handlers build plain dicts (cheap, and byte-for-byte OpenAI); these models exist so the
served OpenAPI document states what really comes back, every status included, and so a
schema-driven client or fuzzer (tests/reliability) can hold the server to it.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from server.api.protocol import ChatCompletionRequest, CompletionRequest


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Open):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Open):
    error: ErrorDetail


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(_Open):
    role: str
    content: str | None = None


class ChatChoice(_Open):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletion(_Open):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    alignment: dict[str, Any] | None = None


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class Completion(_Open):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    alignment: dict[str, Any] | None = None


class ModelCard(_Open):
    id: str
    object: str
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    max_model_len: int


class ModelList(_Open):
    object: str
    data: list[ModelCard]


class Health(_Open):
    status: str


class LoRALoaded(_Open):
    object: str
    id: str
    message: str


class IndexInfo(_Open):
    object: str
    name: str
    kind: str
    index_type: str
    num_documents: int
    num_passages: int
    dim: int


class IndexList(_Open):
    object: str
    data: list[IndexInfo]


class Deleted(_Open):
    object: str
    deleted: bool


class DocumentsAdded(_Open):
    object: str
    index: str
    added_documents: int
    added_passages: int
    ids: list[str]


class SearchHit(_Open):
    id: str
    doc_id: str
    title: str
    text: str
    score: float
    metadata: dict[str, Any]


class SearchResults(_Open):
    object: str
    data: list[SearchHit]


class Embedding(_Open):
    object: str
    index: int
    embedding: list[float] | str


class EmbeddingUsage(_Open):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Open):
    object: str
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


_ERROR_TEXT = {400: "Invalid request", 401: "Missing or wrong API key", 403: "Not allowed",
               404: "No such model, adapter, index or document", 409: "Conflicts with the server's state",
               413: "Request body too large", 415: "Unsupported upload type", 429: "Queue full; retry after `Retry-After` seconds",
               503: "Draining for shutdown, or the engine is down", 504: "The request's deadline passed"}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for error statuses, all with the OpenAI error body."""
    return {s: {"model": ErrorResponse, "description": _ERROR_TEXT[s]} for s in statuses}


def documented(model: type[BaseModel], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses` for a JSON route: `model` on 200, the OpenAI error body on `statuses`."""
    return {200: {"model": model}, **errors(*statuses)}


# Every route that needs the key can answer 401, and any route can meet a draining server.
COMMON = (401, 503)
GENERATION_ERRORS = errors(*COMMON, 400, 404, 413, 429, 504)
SSE_DESCRIPTION = ("`stream: false`: one JSON object. `stream: true`: `text/event-stream`, one "
                   "`data: {chunk}` line per step and a final `data: [DONE]`.")


# OpenAPI 3.1: an event stream's `schema` describes one event. `data` is a JSON chunk
# (chat.completion.chunk / text_completion, or an OpenAI error object) or the final `[DONE]`.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "JSON chunk, error object, or [DONE]"},
    "event": {"type": "string"}}}


def generation_response(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    ok = {"model": model, "description": SSE_DESCRIPTION, "content": {"text/event-stream": {"schema": SSE_EVENT}}}
    return {200: ok, **GENERATION_ERRORS}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body itself (off the event loop)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest)


def add_request_schemas(spec: dict[str, Any], extra: tuple[type[BaseModel], ...] = ()) -> dict[str, Any]:
    """Put the request models the routes reference into components, and drop FastAPI's 422
    entries: validation errors are answered as OpenAI 400s."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in REQUEST_MODELS + extra:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    for path in spec.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return spec
