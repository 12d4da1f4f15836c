"""FastAPI app factory: wires the async engine, routes, auth, metrics and error handlers."""
from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.errors import APIError, install_error_handlers
from server.api.protocol import ChatCompletionRequest, CompletionRequest, now
from server.api.routes_adapters import adapter_router
from server.api.serving import OpenAIServing
from server.engine.async_engine import AsyncEngine
from server.engine.engine import LLMEngine
from server.engine.metrics import ServerMetrics

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def build_app(engine: LLMEngine, model_name: str, api_key: str | None = None,
              adapter_root: Path | None = None) -> FastAPI:
    """Create the HTTP app serving `engine` under the name `model_name`."""
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, on_step=lambda e: metrics.update_engine(e.stats()))
    serving = OpenAIServing(async_engine, model_name, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        async_engine.shutdown()

    app = FastAPI(title="alignserve", lifespan=lifespan)
    app.state.engine = async_engine
    app.state.metrics = metrics
    install_error_handlers(app)

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", None, "invalid_api_key")

    auth = [Depends(require_key)]
    app.include_router(adapter_router(async_engine, model_name, adapter_root, auth))

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_healthy:
            return JSONResponse({"status": "engine dead"}, status_code=503)
        return Response(status_code=200)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        created = now()
        data = [{"id": model_name, "object": "model", "created": created, "owned_by": "alignserve",
                 "root": str(engine.model_dir), "parent": None, "max_model_len": engine.max_model_len}]
        for name, adapter in await async_engine.call(lambda e: [(n, e.adapters.get(n)) for n in e.adapters.names()]):
            data.append({"id": name, "object": "model", "created": created, "owned_by": "alignserve",
                         "root": str(adapter.weights.path), "parent": model_name,
                         "max_model_len": engine.max_model_len, "role": adapter.weights.role})
        return {"object": "list", "data": data}

    @app.get("/metrics", dependencies=auth)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatCompletionRequest, raw: Request):
        prep = serving.prepare_chat(body)
        return await _respond(prep, raw)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, raw: Request):
        prep = serving.prepare_completion(body)
        return await _respond(prep, raw)

    async def _respond(prep, raw: Request):
        params = serving.sampling_params(prep)
        if prep.body.stream:
            return StreamingResponse(serving.stream(prep, params), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return await serving.complete(prep, params, raw)

    return app
