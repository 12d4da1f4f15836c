"""The web playground and what it reads to build itself.

- `GET /` : a small landing page linking to the playground and the API docs.
- `GET /playground` and `/playground/assets/*` : plain HTML/JS/CSS from `server/api/playground/`
  (no CDN, no build step). They carry no secrets, so the guard serves them without the key;
  the page asks for the key and sends it on every API call.
- `GET /v1/capabilities` : which request options this server takes, with their JSON schemas
  and defaults, derived from the request model (`ChatCompletionRequest`) and its validators,
  so the page shows only what the server has. Needs the key like any other API route.

It does not serve generations or touch the engine beyond read-only peeks (model name, limits).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from server.api import schemas
from server.api.protocol import ChatCompletionRequest

PLAYGROUND_DIR = Path(__file__).resolve().parent / "playground"

# Request fields of each test-time method, keyed by the name its `alignment` report carries
# (the `name` of its class in server/methods). The first field switches the method on.
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "best_of_n": ("best_of", "reward_model"),
    "dola": ("dola_layers", "dola_relative_top", "dola_apply_final_norm"),
    "genarm": ("genarm",),
    "search": ("search",),
    "rain": ("rain",),
    "rag": ("rag",),
    "knn_lm": ("knn_lm",),
}
# Fields that name an adapter (with the role the engine requires, None: any) or a retrieval
# store (its `kind` in GET /v1/indexes): the page offers a picker instead of a text box.
ADAPTER_FIELDS: dict[str, str | None] = {"reward_model": "rm", "genarm.reward_model": None,
                                         "search.reward_model": "rm", "rain.evaluator": "rm"}
STORE_FIELDS: dict[str, str] = {"rag.index": "collection", "knn_lm.datastore": "knn_datastore"}
NEEDS_RETRIEVAL = frozenset({"rag", "knn_lm"})
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "top_logprobs")
# A placeholder for required strings when probing the validators (they never look names up).
_PROBE_STRING = "x"


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """`schema` with every local $ref inlined (the page reads plain nested schemas)."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            target = defs[schema["$ref"].rsplit("/", 1)[-1]]
            return _resolve({**copy.deepcopy(target), **{k: v for k, v in schema.items() if k != "$ref"}}, defs)
        return {k: _resolve(v, defs) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_resolve(v, defs) for v in schema]
    return schema


def _probe_value(schema: dict[str, Any]) -> Any:
    """The smallest valid value of a method's switch field (defaults, a placeholder name)."""
    if "anyOf" in schema:
        schema = next(s for s in schema["anyOf"] if s.get("type") != "null")
    kind = schema.get("type")
    if kind == "object":
        return {k: _probe_value(schema["properties"][k]) for k in schema.get("required", [])}
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    if kind == "integer":
        return max(2, schema.get("minimum", 2))
    if kind == "string":
        return _PROBE_STRING
    if kind == "array":
        return [max(1, schema.get("items", {}).get("minimum", 1))]
    return schema.get("default")


def _accepts(body: dict[str, Any]) -> bool:
    try:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **body})
    except (ValidationError, ValueError):
        return False
    return True


def capabilities(model_name: str, adapter_loading: bool, retrieval: bool) -> dict[str, Any]:
    """What the playground may offer: sampling fields, methods (fields, schemas, defaults,
    whether they stream and report logprobs, which pairs conflict), and server features.
    Behaviour is read from the request model's validators by probing them."""
    spec = ChatCompletionRequest.model_json_schema()
    props = _resolve(spec["properties"], spec.get("$defs", {}))
    methods: dict[str, Any] = {}
    switches: dict[str, dict[str, Any]] = {}
    for name, fields in METHOD_FIELDS.items():
        if fields[0] not in props or (name in NEEDS_RETRIEVAL and not retrieval):
            continue
        switch = {fields[0]: _probe_value(props[fields[0]])}
        if not _accepts(switch):
            continue
        switches[name] = switch
        methods[name] = {"fields": {f: props[f] for f in fields if f in props}, "switch": switch,
                         "streamable": _accepts({**switch, "stream": True}),
                         "logprobs": _accepts({**switch, "logprobs": True, "top_logprobs": 1})}
    names = list(switches)
    conflicts = [[a, b] for i, a in enumerate(names) for b in names[i + 1:]
                 if not _accepts({**switches[a], **switches[b]})]
    return {"object": "capabilities", "model": model_name,
            "sampling": {f: props[f] for f in SAMPLING_FIELDS if f in props},
            "methods": methods, "conflicts": conflicts,
            "adapter_fields": ADAPTER_FIELDS, "store_fields": STORE_FIELDS,
            "features": {"adapter_loading": adapter_loading, "retrieval": retrieval, "metrics": True}}


LANDING = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>alignserve</title></head>
<body><main><h1>alignserve</h1>
<p>An OpenAI-compatible server for test-time alignment.</p>
<ul><li><a href="/playground">Playground</a>: chat, switch methods on, see what they did</li>
<li><a href="/docs">API docs</a> (needs the API key if the server has one)</li></ul></main></body></html>
"""


def playground_router(model_name: str, adapter_loading: bool, retrieval: bool) -> APIRouter:
    router = APIRouter()
    caps = capabilities(model_name, adapter_loading, retrieval)  # fixed for the process

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def landing() -> HTMLResponse:
        return HTMLResponse(LANDING)

    @router.get("/playground", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(PLAYGROUND_DIR / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    @router.get("/v1/capabilities", responses=schemas.errors(*schemas.COMMON))
    async def get_capabilities() -> dict:
        return caps

    return router


def mount_playground(app) -> None:
    """Serve the page's assets under /playground/assets (StaticFiles refuses path escapes)."""
    app.mount("/playground/assets", StaticFiles(directory=PLAYGROUND_DIR), name="playground")
