"""FastAPI app factory: wires the async engine, routes, guards, metrics and error handlers."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api import schemas
from server.api.errors import install_error_handlers
from server.api.guards import GuardMiddleware, GuardState
from server.api.protocol import ChatCompletionRequest, CompletionRequest, now
from server.api.routes_adapters import adapter_router
from server.api.routes_playground import mount_playground, playground_router
from server.api.routes_retrieval import AddDocumentsRequest, DocumentIn, retrieval_router
from server.api.routes_utility import REQUEST_MODELS as UTILITY_REQUESTS, utility_router
from server.api.serving import OpenAIServing
from server.engine.async_engine import AsyncEngine
from server.engine.engine import LLMEngine
from server.engine.metrics import ServerMetrics

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


@dataclass(frozen=True)
class Limits:
    """Operator limits on what one request, and the queue, may take."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_queue_len: int = 256  # requests admitted beyond the engine's max_num_seqs
    request_timeout: float = 600.0  # seconds from arrival to the last token; 0: none


def build_app(engine: LLMEngine, model_name: str, api_key: str | None = None,
              adapter_root: Path | None = None, limits: Limits = Limits(), retrieval=None) -> FastAPI:
    """Create the HTTP app serving `engine` under the name `model_name`; `retrieval`
    (retrieval.service.Retrieval) serves collections, embeddings and `rag`."""
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, on_step=lambda e: metrics.update_engine(e.stats()))
    serving = OpenAIServing(async_engine, model_name, metrics, limits.request_timeout, retrieval)
    capacity = engine.config.scheduler.max_num_seqs + limits.max_queue_len
    guard = GuardState(api_key=api_key, max_body_bytes=limits.max_body_bytes, admission_paths=GENERATION_PATHS,
                       max_admitted=capacity, metrics=metrics)
    metrics.queue_capacity.set(capacity)
    metrics.request_timeout.set(limits.request_timeout)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        async_engine.shutdown()
        if retrieval is not None:
            retrieval.close()

    app = FastAPI(title="alignserve", version="0.1.0", lifespan=lifespan)
    app.state.engine = async_engine
    app.state.metrics = metrics
    app.state.guard = guard
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, state=guard)
    app.include_router(adapter_router(async_engine, model_name, adapter_root, []))  # auth: GuardMiddleware
    app.include_router(utility_router(serving))  # /tokenize, /detokenize, /version
    if retrieval is not None:
        app.include_router(retrieval_router(retrieval))
    app.include_router(playground_router(model_name, adapter_root is not None, retrieval is not None))
    mount_playground(app)

    @app.get("/health", responses=schemas.documented(schemas.Health, 503))
    async def health() -> Response:
        if not async_engine.is_healthy:
            return JSONResponse({"status": "engine dead"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", responses=schemas.documented(schemas.ModelList, *schemas.COMMON))
    async def models() -> dict:
        created = now()
        data = [{"id": model_name, "object": "model", "created": created, "owned_by": "alignserve",
                 "root": model_name, "parent": None, "max_model_len": engine.max_model_len}]
        for name, adapter in await async_engine.call(lambda e: [(n, e.adapters.get(n)) for n in e.adapters.names()]):
            data.append({"id": name, "object": "model", "created": created, "owned_by": "alignserve",
                         "root": adapter.weights.display_path or name, "parent": model_name,
                         "max_model_len": engine.max_model_len, "role": adapter.weights.role})
        return {"object": "list", "data": data}

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
              "description": "Prometheus text exposition format"}, **schemas.errors(*schemas.COMMON)})
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions", responses=schemas.generation_response(schemas.ChatCompletion),
              openapi_extra=schemas.request_body(ChatCompletionRequest))
    async def chat(raw: Request):
        return await _respond("chat", raw)

    @app.post("/v1/completions", responses=schemas.generation_response(schemas.Completion),
              openapi_extra=schemas.request_body(CompletionRequest))
    async def completions(raw: Request):
        return await _respond("completion", raw)

    async def _respond(kind: str, raw: Request):
        body = await raw.body()
        # Parsing, templating and tokenizing a large body take real time: off the event loop.
        prep, params = await asyncio.to_thread(serving.prepare, kind, body)
        if prep.body.stream:
            source = await serving.open_stream(prep, params)
            return StreamingResponse(serving.stream(prep, params, source), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return await serving.complete(prep, params, raw)

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            if api_key is not None:
                spec.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}}
                spec["security"] = [{"bearer": []}]
                spec["paths"]["/health"]["get"]["security"] = []
            app.openapi_schema = schemas.add_request_schemas(spec, (AddDocumentsRequest, DocumentIn, *UTILITY_REQUESTS))
        return app.openapi_schema

    app.openapi = openapi
    return app

