"""Ray Serve deployments: N `EngineReplica`s of our engine behind one `Ingress`.

Each `EngineReplica` builds the single-server app (server/api/app.py `build_app`) around its own
engine and answers requests given as data (`asgi_bridge.HttpRequest`), so every route, method
and extension field works as on one server. The `Ingress` is the HTTP entry (Serve's proxy on
--host/--port): it computes the `RoutingKey` (server/scale/routing.py) and forwards through the
deployment handle, whose router (server/scale/ray_router.py) picks the replica; responses come
back as a stream (status+headers first, then chunks), SSE included. It also owns what must
reach every replica: `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` are broadcast (a
call pinned to each running replica) and recorded in the `AdapterManifest` actor, from which a
restarted replica loads them again; `/metrics` is gathered from every replica and merged with a
`replica` label. A replica that dies mid-request makes its requests answer 503 with
`Retry-After: 1` (mid-stream: a final error event); Ray's controller starts a replacement.

Imports Ray: loaded only by `alignserve serve --replicas N` (server/scale/launch.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.api.errors import error_body
from server.scale.asgi_bridge import HttpRequest, call_asgi, merge_metrics, read_all
from server.scale.launch import ReplicaSpec
from server.scale.routing import RoutingConfig, RoutingKey, routing_key

logger = logging.getLogger(__name__)

NAMESPACE = "alignserve"
APP_NAME = "alignserve"
REPLICA_DEPLOYMENT = "EngineReplica"
ADAPTER_ROUTES = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
REPLICA_HEADER = b"x-alignserve-replica"
# A dead replica surfaces as one of these on the handle's response stream.
REPLICA_GONE = (RayActorError, ActorUnavailableError)
BROADCAST_TIMEOUT_S = 60.0


@ray.remote(num_cpus=0)
class AdapterManifest:
    """Adapters loaded at runtime through the ingress, so a restarted replica loads them too."""

    def __init__(self) -> None:
        self._adapters: dict[str, str] = {}

    def put(self, name: str, path: str) -> None:
        self._adapters[name] = path

    def remove(self, name: str) -> None:
        self._adapters.pop(name, None)

    def items(self) -> list[tuple[str, str]]:
        return list(self._adapters.items())


def manifest_name(app_name: str) -> str:
    return f"{app_name}-adapters"


class EngineReplica:
    """One engine and its full single-server app, inside a Ray Serve replica."""

    def __init__(self, spec: ReplicaSpec, manifest: str) -> None:
        import torch

        from adapters.peft_format import load_peft_adapter
        from retrieval.service import Retrieval, default_root
        from server.api.app import build_app
        from server.engine.engine import LLMEngine

        torch.set_num_threads(max(1, spec.num_threads))
        sys.setswitchinterval(spec.gil_switch_interval_ms / 1000.0)  # why: server.config.GIL_SWITCH_INTERVAL_MS
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        engine = LLMEngine(spec.engine_config)
        rank = spec.engine_config.lora.max_lora_rank
        for name, path in spec.lora_modules:
            engine.add_adapter(name, load_peft_adapter(path, engine.model_config, rank, name))
        runtime = ray.get(ray.get_actor(manifest, namespace=NAMESPACE).items.remote())
        for name, path in runtime:
            if name not in dict(spec.lora_modules):
                engine.add_adapter(name, load_peft_adapter(path, engine.model_config, rank, name, spec.adapter_root))
        retrieval = Retrieval(spec.index_root or default_root(), use_gpu=engine.device.type == "cuda")
        self._app = build_app(engine, spec.model_name, spec.api_key, spec.adapter_root, spec.limits, retrieval)
        logger.info("replica %s: %d KV blocks, %d adapters reloaded", self.replica_id, engine.num_blocks,
                    len(runtime))

    async def handle(self, route: dict, request: HttpRequest):
        """Run the app on `request`; `route` is only read by the router (ray_router.py)."""
        stamp = (REPLICA_HEADER, self.replica_id.encode())
        if request.method == "GET" and request.path == "/metrics":
            status, headers, body = await read_all(call_asgi(self._app, request))
            if status == 200:
                body += (await self._residency()).encode()
            yield {"status": status, "headers": [h for h in headers if h[0].lower() != b"content-length"] + [stamp]}
            yield body
            return
        async for item in call_asgi(self._app, request):
            if isinstance(item, dict):
                item = {"status": item["status"], "headers": item["headers"] + [stamp]}
            yield item

    async def _resident(self) -> dict[str, bool]:
        def read(engine) -> dict[str, bool]:
            return {n: engine.adapters.get(n).slot >= 0 for n in engine.adapters.names()}
        return await self._app.state.engine.call(read)

    async def _residency(self) -> str:
        lines = ["# HELP alignserve_lora_adapter_resident LoRA adapter in a device slot on this replica (1) or not",
                 "# TYPE alignserve_lora_adapter_resident gauge"]
        for name, resident in (await self._resident()).items():
            lines.append(f'alignserve_lora_adapter_resident{{adapter="{name}"}} {float(resident)}')
        return "\n".join(lines) + "\n"

    async def record_routing_stats(self) -> dict:
        """Read by the router: which adapters this replica holds in device slots."""
        return {"adapters": [n for n, resident in (await self._resident()).items() if resident]}

    def check_health(self) -> None:
        # NOTE: a dead engine thread makes Ray replace this replica.
        if not self._app.state.engine.is_healthy:
            raise RuntimeError(f"replica {self.replica_id}: engine thread died")

    def __del__(self) -> None:
        app = getattr(self, "_app", None)
        if app is not None:
            app.state.engine.shutdown()


def _unavailable(message: str) -> JSONResponse:
    return JSONResponse(error_body(503, message, None, "replica_unavailable"), status_code=503,
                        headers={"Retry-After": "1"})


def _response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
    response = Response(content=body, status_code=status)
    response.raw_headers = [h for h in headers if h[0].lower() != b"content-length"] + [
        (b"content-length", str(len(body)).encode())]
    return response


class Ingress:
    """HTTP entry of the deployment: routing keys, forwarding, broadcasts and merged metrics."""

    def __init__(self, engines, base_model: str, manifest: str, app_name: str,
                 routing: RoutingConfig = RoutingConfig()) -> None:
        self._engines = engines.options(stream=True)
        self._base_model = base_model
        self._manifest = ray.get_actor(manifest, namespace=NAMESPACE)
        self._app_name = app_name
        self._routing = routing

    async def __call__(self, raw: Request) -> Response:
        client = (raw.client.host, raw.client.port) if raw.client else ("127.0.0.1", 0)
        request = HttpRequest(raw.method, raw.url.path, raw.url.query.encode(), tuple(raw.headers.raw),
                              await raw.body(), client)
        if request.method == "POST" and request.path in ADAPTER_ROUTES:
            return await self._adapter_route(request)
        if request.method == "GET" and request.path == "/metrics":
            return await self._metrics(request)
        return await self._forward(request, routing_key(request.path, request.body, self._base_model, self._routing))

    async def _forward(self, request: HttpRequest, key: RoutingKey) -> Response:
        stream = self._engines.handle.remote(key.as_dict(), request)
        try:
            start = await stream.__anext__()
        except REPLICA_GONE as exc:
            return _unavailable(f"the replica serving this request stopped ({type(exc).__name__}); retry")
        headers = start["headers"]
        if dict(headers).get(b"content-type", b"").startswith(b"text/event-stream"):
            response = StreamingResponse(self._relay(stream), status_code=start["status"])
            response.raw_headers = [h for h in headers if h[0].lower() != b"content-length"]
            return response
        # NOTE: a whole body is read before answering, so a replica that dies mid-request still
        # gives the client a clean 503 rather than a truncated 200.
        try:
            body = b"".join([chunk async for chunk in stream])
        except REPLICA_GONE as exc:
            return _unavailable(f"the replica serving this request stopped ({type(exc).__name__}); retry")
        return _response(start["status"], headers, body)

    async def _relay(self, stream):
        try:
            async for chunk in stream:
                yield chunk
        except REPLICA_GONE:
            event = error_body(503, "the replica serving this stream stopped; retry", None, "replica_unavailable")
            yield b"data: " + json.dumps(event).encode() + b"\n\n"
        finally:
            stream.cancel()  # the client went away (or the stream ended): stop the replica's work

    async def _replica_ids(self) -> list[str]:
        from ray.serve.context import _get_global_client

        # NOTE: Serve's controller is the source of truth for which replicas run now.
        details = await asyncio.to_thread(lambda: _get_global_client().get_serve_details())
        deployment = details["applications"][self._app_name]["deployments"][REPLICA_DEPLOYMENT]
        return [r["replica_id"] for r in deployment["replicas"] if r["state"] == "RUNNING"]

    async def _on_each(self, request: HttpRequest) -> dict[str, tuple[int, list, bytes] | BaseException]:
        results: dict[str, tuple[int, list, bytes] | BaseException] = {}
        # NOTE: one at a time: concurrent calls from one HTTP request share Ray's internal
        # request id, and Ray's router would route only one of them (see ray_router.py).
        for replica_id in await self._replica_ids():
            try:
                results[replica_id] = await self._on_replica(replica_id, request)
            except (*REPLICA_GONE, asyncio.TimeoutError) as exc:
                results[replica_id] = exc
        return results

    async def _on_replica(self, replica_id: str, request: HttpRequest) -> tuple[int, list, bytes]:
        stream = self._engines.handle.remote(RoutingKey(replica=replica_id).as_dict(), request)
        return await asyncio.wait_for(read_all(stream), BROADCAST_TIMEOUT_S)

    async def _adapter_route(self, request: HttpRequest) -> Response:
        try:
            body = json.loads(request.body)
            name = body.get("lora_name") if isinstance(body, dict) else None
        except ValueError:
            name = None
        results = await self._on_each(request)
        if not results:
            return _unavailable("no replica is running; retry")
        failed = {i: r for i, r in results.items() if isinstance(r, BaseException)}
        if failed:
            logger.warning("adapter route failed on replicas %s", failed)
        answers = {i: r for i, r in results.items() if not isinstance(r, BaseException)}
        ok = [i for i, r in answers.items() if r[0] == 200]
        loading = request.path == "/v1/load_lora_adapter"
        if loading:
            if ok and len(ok) == len(results):
                await self._manifest.put.remote(name, body["lora_path"])
                return _response(*answers[ok[0]])
            # Partial load: take it back where it succeeded, so every replica holds the same set.
            undo = request.with_path("POST", "/v1/unload_lora_adapter", json.dumps({"lora_name": name}).encode())
            for replica_id in ok:
                try:
                    await self._on_replica(replica_id, undo)
                except (*REPLICA_GONE, asyncio.TimeoutError):
                    pass  # a replica that died holds nothing; its replacement reads the manifest
        else:
            gone = all(r[0] in (200, 404) for r in answers.values())
            if ok:
                await self._manifest.remove.remote(name)
            if ok and gone and not failed:
                return _response(*answers[ok[0]])
        refusal = next((r for r in answers.values() if r[0] != 200), None)
        return _response(*refusal) if refusal else _unavailable("a replica stopped during the adapter change; retry")

    async def _metrics(self, request: HttpRequest) -> Response:
        results = await self._on_each(request)
        texts = {}
        for replica_id, result in results.items():
            if isinstance(result, BaseException):
                continue  # a replica that died between listing and asking has no metrics to give
            if result[0] != 200:
                return _response(*result)  # 401 without the key, as on one server
            texts[replica_id] = result[2].decode()
        return Response(merge_metrics(texts), media_type="text/plain; version=0.0.4; charset=utf-8")
