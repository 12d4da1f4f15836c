"""Retrieval routes: collections (`/v1/indexes...`) and OpenAI's `/v1/embeddings`.

Every call into the retrieval layer (embedding, faiss, SQLite) runs in a worker thread; the
event loop only parses and answers. Auth and the body-size limit come from GuardMiddleware.
Documents arrive as JSON (`{"documents": [...]}` or a bare list) or as a multipart upload of
.txt / .md / .jsonl files.
"""
from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from retrieval.chunking import DocumentError, parse_upload
from retrieval.service import MAX_DOC_CHARS, MAX_TOP_K, Retrieval
from retrieval.store import StoreError
from server.api import schemas
from server.api.errors import APIError
from server.api.protocol import STRICT

MAX_DOCUMENTS = 10_000  # per request; more is a 413 (split the upload)
MAX_EMBED_INPUTS = 2048  # OpenAI's own limit on inputs per embeddings request
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class CreateIndexRequest(BaseModel):
    model_config = STRICT

    name: str = Field(min_length=1, max_length=300)
    index_type: Literal["auto", "flat", "hnsw", "ivf"] = "auto"
    chunk_words: int = Field(100, ge=10, le=1000)
    chunk_overlap: int = Field(20, ge=0, le=500)


class DocumentIn(BaseModel):
    model_config = STRICT

    id: str | None = Field(None, min_length=1, max_length=200)
    title: str = ""
    text: str = Field(min_length=1)
    metadata: dict[str, Any] | None = None


class AddDocumentsRequest(BaseModel):
    model_config = STRICT

    documents: list[DocumentIn] = Field(min_length=1)


class SearchRequest(BaseModel):
    model_config = STRICT

    query: str = Field(min_length=1)
    top_k: int = Field(4, ge=1, le=MAX_TOP_K)
    min_score: float | None = Field(None, ge=-1.0, le=1.0)


class EmbeddingRequest(BaseModel):
    model_config = STRICT

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


def _documents_body() -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/AddDocumentsRequest"}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"anyOf": [ref, {"type": "array", "minItems": 1,
                                                         "items": {"$ref": "#/components/schemas/DocumentIn"}}]}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


def _store_error(exc: StoreError | DocumentError) -> APIError:
    if isinstance(exc, DocumentError):
        return APIError(exc.status, str(exc), "documents")
    return APIError(exc.status, str(exc), exc.param)


async def _call(fn, *args):
    try:
        return await asyncio.to_thread(fn, *args)
    except (StoreError, DocumentError) as exc:
        raise _store_error(exc) from exc


def retrieval_router(retrieval: Retrieval) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/indexes", responses=schemas.documented(schemas.IndexInfo, *schemas.COMMON, 400, 409, 413))
    async def create_index(body: CreateIndexRequest) -> dict:
        return await _call(retrieval.create, body.name, body.index_type, body.chunk_words, body.chunk_overlap)

    @router.get("/v1/indexes", responses=schemas.documented(schemas.IndexList, *schemas.COMMON))
    async def list_indexes() -> dict:
        return {"object": "list", "data": await _call(retrieval.list)}

    @router.get("/v1/indexes/{name}", responses=schemas.documented(schemas.IndexInfo, *schemas.COMMON, 400, 404))
    async def get_index(name: str) -> dict:
        return await _call(retrieval.info, name)

    @router.delete("/v1/indexes/{name}", responses=schemas.documented(schemas.Deleted, *schemas.COMMON, 400, 404))
    async def delete_index(name: str) -> dict:
        await _call(retrieval.delete, name)
        return {"object": "index.deleted", "name": name, "deleted": True}

    @router.post("/v1/indexes/{name}/documents", openapi_extra=_documents_body(),
                 responses=schemas.documented(schemas.DocumentsAdded, *schemas.COMMON, 400, 404, 413, 415))
    async def add_documents(name: str, raw: Request) -> dict:
        content_type = raw.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            docs = await _uploaded(raw)
        elif content_type.split(";")[0].strip() in ("application/json", ""):
            docs = await asyncio.to_thread(_json_documents, await raw.body())
        else:
            raise APIError(415, f"unsupported content type {content_type!r}: send application/json or "
                                "multipart/form-data", None, "unsupported_media_type")
        if len(docs) > MAX_DOCUMENTS:
            raise APIError(413, f"{len(docs)} documents in one request; the limit is {MAX_DOCUMENTS}", "documents")
        return await _call(retrieval.add, name, docs)

    @router.delete("/v1/indexes/{name}/documents/{doc_id}",
                   responses=schemas.documented(schemas.Deleted, *schemas.COMMON, 400, 404))
    async def delete_document(name: str, doc_id: str) -> dict:
        return await _call(retrieval.delete_document, name, doc_id)

    @router.post("/v1/indexes/{name}/search",
                 responses=schemas.documented(schemas.SearchResults, *schemas.COMMON, 400, 404, 413))
    async def search(name: str, body: SearchRequest) -> dict:
        hits = await _call(retrieval.search, name, body.query, body.top_k, body.min_score)
        return {"object": "list", "index": name, "data": [h.to_dict() for h in hits]}

    @router.post("/v1/embeddings", responses=schemas.documented(schemas.EmbeddingList, *schemas.COMMON, 400, 404, 413))
    async def embeddings(body: EmbeddingRequest) -> dict:
        texts = _embedding_inputs(body, retrieval.embedder.name)
        vectors, counts = await asyncio.to_thread(
            lambda: (retrieval.embedder.encode(texts), retrieval.embedder.count_tokens(texts)))
        data = []
        for i, v in enumerate(vectors):
            value: Any = (base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                          if body.encoding_format == "base64" else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = int(sum(counts))
        return {"object": "list", "data": data, "model": retrieval.embedder.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return router


def _embedding_inputs(body: EmbeddingRequest, model_name: str) -> list[str]:
    if body.model is not None and body.model != model_name:
        raise APIError(404, f"The model `{body.model}` does not exist; embeddings are served by `{model_name}`.",
                       "model", "model_not_found")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise APIError(400, "input must not be empty", "input")
    if not all(isinstance(t, str) for t in texts):
        raise APIError(400, "token-id inputs are not supported: send text", "input")
    if any(not t for t in texts):
        raise APIError(400, "input strings must not be empty", "input")
    if len(texts) > MAX_EMBED_INPUTS:
        raise APIError(400, f"at most {MAX_EMBED_INPUTS} inputs per request", "input")
    if body.dimensions is not None:
        raise APIError(400, f"`{model_name}` has a fixed dimension; `dimensions` is not supported", "dimensions")
    return texts


def _json_documents(raw: bytes):
    from retrieval.chunking import make_document

    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", None, "invalid_json") from exc
    if isinstance(data, dict) and set(data) == {"documents"}:
        data = data["documents"]
    if not isinstance(data, list) or not data:
        raise APIError(400, "send a non-empty JSON list of documents, or {\"documents\": [...]}", "documents")
    if len(data) > MAX_DOCUMENTS:
        raise APIError(413, f"{len(data)} documents in one request; the limit is {MAX_DOCUMENTS}", "documents")
    try:
        return [make_document(d, MAX_DOC_CHARS) for d in data]
    except DocumentError as exc:
        raise _store_error(exc) from exc


async def _uploaded(raw: Request):
    form = await raw.form()
    files = [v for _, v in form.multi_items() if hasattr(v, "filename") and hasattr(v, "read")]
    if not files:
        raise APIError(400, "a multipart upload needs at least one file (field `files`)", "files")
    docs = []
    for f in files:
        data = await f.read()
        try:
            docs += await asyncio.to_thread(parse_upload, f.filename or "", data, MAX_DOC_CHARS)
        except DocumentError as exc:
            raise _store_error(exc) from exc
    await form.close()
    return docs
