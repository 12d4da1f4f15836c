"""Our app run on a request given as data (server/scale/asgi_bridge.py), and merged metrics; no Ray."""
from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.scale.asgi_bridge import HttpRequest, call_asgi, merge_metrics, read_all


def small_app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        return {"got": body}

    @app.get("/stream")
    async def stream():
        async def events():
            for i in range(3):
                yield f"data: {i}\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_a_request_as_data_gets_status_headers_and_streamed_chunks():
    app = small_app()
    body = b'{"a": 1}'
    request = HttpRequest("POST", "/echo", b"", ((b"content-type", b"application/json"),
                                                 (b"content-length", str(len(body)).encode())), body)
    status, headers, out = asyncio.run(read_all(call_asgi(app, request)))
    assert status == 200 and out == b'{"got":{"a":1}}' and (b"content-type", b"application/json") in headers

    async def chunks():
        return [item async for item in call_asgi(app, HttpRequest("GET", "/stream"))]

    items = asyncio.run(chunks())
    assert items[0]["status"] == 200 and b"".join(items[1:]) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert asyncio.run(read_all(call_asgi(app, HttpRequest("GET", "/nowhere"))))[0] == 404


def test_merged_metrics_label_every_sample_by_replica():
    texts = {}
    for replica, count in (("r1", 3), ("r2", 5)):
        registry = CollectorRegistry()
        Counter("alignserve_model_requests", "per model", ["model"], registry=registry).labels("a1").inc(count)
        Gauge("alignserve_kv_cache_usage_ratio", "kv", registry=registry).set(count / 10)
        texts[replica] = generate_latest(registry).decode()
    merged = merge_metrics(texts)
    samples = {(s.name, s.labels.get("replica"), s.labels.get("model")): s.value
               for f in text_string_to_metric_families(merged) for s in f.samples}
    assert samples[("alignserve_model_requests_total", "r1", "a1")] == 3
    assert samples[("alignserve_model_requests_total", "r2", "a1")] == 5
    assert samples[("alignserve_kv_cache_usage_ratio", "r2", None)] == 0.5
    assert merged.count("# TYPE alignserve_kv_cache_usage_ratio gauge") == 1
