"""`alignserve serve --backend vllm`: our OpenAI front over vLLM's engine (plain, LoRA, RAG).

Choice: vLLM's own OpenAI server runs as a child process on loopback (vllm_process.py) behind
this thin FastAPI app, rather than AsyncLLM inside our process, because
- vLLM pins its own torch, transformers and companions; in a child it can live in another
  virtualenv (`make vllm` on CPU hosts) and our process never imports it (`make test` does not
  need it), and its multiprocess executor for tensor/pipeline parallelism runs as vLLM intends;
- every request still goes through our code first: our pydantic protocol and its 400s, our
  chat template and RAG retrieval (the prompt is sent to vLLM as token ids, so both backends
  see the same prompt), and our response builders (`OpenAIServing.stream/complete`, fed by
  `VLLMClient` with the deltas our engine would give): same error format, extension fields,
  `alignment` object and tool-call parsing.
Methods that need our engine's internals (taps, forks, rewinds, shadow sequences, reward
scores) answer a 400 naming the method and the backend. Best-of-N is one of them: its reward
model reads hidden states at the last position, which vLLM's generate engine does not return,
and a vLLM pooling engine for the reward adapter would be a second copy of the base weights.
LoRA adapters are vLLM's runtime adapters behind our load/unload routes, checked by our PEFT
reader first (paths inside --adapter-root, shapes, rank). Not served here: echo,
prompt_logprobs, max_tokens 0, forced tool calls, RAG's extractive mode, /tokenize.
"""
from __future__ import annotations

import asyncio
import itertools
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapters.errors import AdapterError
from adapters.peft_format import load_peft_adapter
from server.api.app import GENERATION_PATHS, SSE_HEADERS, Limits
from server.api.errors import APIError, install_error_handlers
from server.api.guards import GuardMiddleware, GuardState
from server.api.protocol import CompletionRequest, new_id, now
from server.api.routes_adapters import LoadLoRARequest, UnloadLoRARequest
from server.api.serving import OpenAIServing, Prepared
from server.engine.metrics import ServerMetrics
from server.methods.structured import StructuredError, check_schema
from server.scale.vllm_client import VLLMClient, VLLMRequest

BACKEND = "vllm"
# Request field -> (method, what of our engine it needs).
ENGINE_METHODS: dict[str, tuple[str, str]] = {
    "best_of": ("best-of-N", "reward-model scores read from hidden states at the last position"),
    "dola_layers": ("DoLa", "hidden-state taps of early layers"),
    "genarm": ("GenARM", "a shadow sequence with the ARM adapter beside each row"),
    "knn_lm": ("kNN-LM", "the final hidden state at every step"),
    "rain": ("RAIN", "rewinds and self-evaluation through the engine"),
    "search": ("block search", "forks, rewinds and reward-model scores"),
}


def backend_refusal(field: str, what: str) -> APIError:
    return APIError(400, f"{what} is not served by the {BACKEND} backend", field, "unsupported_by_backend")


def check_backend_support(body) -> None:
    """Refuse what vLLM's engine cannot do for us: a 400 naming the method and the backend."""
    for field, (method, needs) in ENGINE_METHODS.items():
        if getattr(body, field) is not None:
            raise APIError(400, f"{method} (`{field}`) needs alignserve's own engine ({needs}); the "
                                f"{BACKEND} backend does not serve it", field, "unsupported_by_backend")
    if getattr(body, "echo", False):
        raise backend_refusal("echo", "echo")
    if body.prompt_logprobs is not None:
        raise backend_refusal("prompt_logprobs", "prompt_logprobs")
    if body.rag is not None and body.rag.mode == "extractive":
        raise backend_refusal("rag", "rag's extractive mode (a span constraint in our engine)")


def structured_outputs(body) -> dict[str, Any] | None:
    """The request's grammar as vLLM's `structured_outputs` (xgrammar both sides)."""
    spec = body.grammar_spec()
    if spec is None:
        return None
    if spec.kind == "tool_calls":
        raise backend_refusal("tool_choice", "a forced tool call (tool_choice required or named)")
    if spec.kind == "json":
        if spec.source is None:
            return {"json_object": True}
        try:
            check_schema(spec.source, spec.param)
        except StructuredError as exc:
            raise APIError(400, str(exc), exc.param) from exc
        return {"json": spec.source}
    key = {"regex": "regex", "choice": "choice", "ebnf": "grammar"}[spec.kind]
    return {key: list(spec.source) if spec.kind == "choice" else spec.source}


@dataclass(frozen=True)
class ServedAdapter:
    """A LoRA adapter vLLM holds, as /v1/models lists it."""

    name: str
    adapter_id: int
    role: str
    rank: int
    display_path: str


class VLLMServing(OpenAIServing):
    """OpenAIServing whose engine is a VLLMClient: our parsing, templating, RAG and response
    building; vLLM's sampling. Only the engine-facing steps are replaced."""

    def __init__(self, client: VLLMClient, tokenizer, model_name: str, metrics: ServerMetrics,
                 max_model_len: int, vocab_size: int, request_timeout: float = 0.0, retrieval=None) -> None:
        # NOTE: not super().__init__: it reaches into our engine (grammar compiler); these are
        # the attributes the inherited request/response code reads.
        self.engine = client
        self.tokenizer = tokenizer
        self.model_name, self.metrics, self.retrieval = model_name, metrics, retrieval
        self.request_timeout = request_timeout or None
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.adapters: dict[str, ServedAdapter] = {}

    def check_model(self, name: str | None) -> str | None:
        if name is None or name == self.model_name:
            return None
        if name in self.adapters:
            return name
        raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def prepare_completion(self, body: CompletionRequest) -> Prepared:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            adapter = self.check_model(body.model)
            rag = self._rag(body, prompt)
            ids = self.tokenizer.encode(rag.rewrite_completion(prompt) if rag is not None else prompt)
            return Prepared("completion", body, ids, body.model or self.model_name, adapter, new_id("cmpl"),
                            annotators=[rag] if rag is not None else [])
        if body.rag is not None:
            raise APIError(400, "rag needs a text prompt to retrieve for, not token ids", "rag")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        return Prepared("completion", body, list(prompt), body.model or self.model_name,
                        self.check_model(body.model), new_id("cmpl"))

    def sampling_params(self, prep: Prepared) -> VLLMRequest:
        body = prep.body
        check_backend_support(body)
        num_prompt = len(prep.prompt_token_ids)
        max_tokens = body.requested_max_tokens()
        if max_tokens is None:
            max_tokens = self.max_model_len - num_prompt
            if max_tokens < 1:
                raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens, "
                                    f"and the prompt has {num_prompt} tokens.", "messages")
        if max_tokens == 0:
            raise backend_refusal("max_tokens", "max_tokens 0 (scoring the prompt only)")
        if num_prompt == 0:
            raise APIError(400, "the prompt is empty", "prompt")
        if num_prompt + max_tokens > self.max_model_len:
            total = num_prompt + max_tokens
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"you requested {total} tokens ({num_prompt} in the prompt, {max_tokens} in the "
                                "completion). Please reduce the length of the prompt or completion.", "max_tokens")
        extra: dict[str, Any] = {}
        for name in ("logit_bias", "allowed_token_ids", "bad_words"):
            if getattr(body, name):
                extra[name] = getattr(body, name)
        so = structured_outputs(body)
        if so is not None:
            extra["structured_outputs"] = so
        return VLLMRequest(body.to_sampling_params(max_tokens, body.requested_logprobs()), extra)


def adapter_router(serving: VLLMServing, model_config, adapter_root: Path | None, max_rank: int) -> APIRouter:
    """Our load/unload routes over vLLM's runtime LoRA: our PEFT reader checks first."""
    router = APIRouter()
    ids = itertools.count(len(serving.adapters) + 1)
    lock = asyncio.Lock()  # NOTE: one load/unload at a time keeps our list and vLLM's in step

    @router.post("/v1/load_lora_adapter")
    async def load(body: LoadLoRARequest) -> dict:
        if body.lora_name == serving.model_name:
            raise APIError(400, f"`{body.lora_name}` is the base model's name", "lora_name")
        if adapter_root is None:
            raise APIError(403, "runtime adapter loading is disabled; start the server with --adapter-root DIR",
                           "lora_path", "adapter_loading_disabled")
        try:
            weights = await asyncio.to_thread(load_peft_adapter, body.lora_path, model_config, max_rank,
                                              body.lora_name, adapter_root)
        except AdapterError as exc:
            raise APIError(exc.status, exc.message, exc.param, "path_not_allowed" if exc.status == 403 else None) from exc
        check_role(weights.role)
        async with lock:
            if body.lora_name in serving.adapters:
                raise APIError(400, f"adapter {body.lora_name!r} is already loaded", "lora_name")
            await relay(await serving.engine.post("/v1/load_lora_adapter", {
                "lora_name": body.lora_name, "lora_path": str(weights.path.resolve())}))
            adapter = ServedAdapter(body.lora_name, next(ids), weights.role, weights.rank, weights.display_path)
            serving.adapters[body.lora_name] = adapter
        return {"object": "lora_adapter", "id": adapter.name, "adapter_id": adapter.adapter_id, "role": adapter.role,
                "rank": adapter.rank, "path": adapter.display_path,
                "message": f"Success: LoRA adapter '{adapter.name}' added successfully."}

    @router.post("/v1/unload_lora_adapter")
    async def unload(body: UnloadLoRARequest) -> dict:
        async with lock:
            if body.lora_name not in serving.adapters:
                raise APIError(404, f"adapter {body.lora_name!r} is not loaded", "lora_name")
            await relay(await serving.engine.post("/v1/unload_lora_adapter", {"lora_name": body.lora_name}))
            del serving.adapters[body.lora_name]
        return {"object": "lora_adapter", "id": body.lora_name, "deleted": True,
                "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}

    return router


def check_role(role: str) -> None:
    """Reward-model and ARM adapters serve methods vLLM's engine cannot run here."""
    if role in ("rm", "arm"):
        method = "best-of-N / block search" if role == "rm" else "GenARM"
        raise APIError(400, f"a {role} adapter serves {method}, which the {BACKEND} backend does not run; "
                            "load it on alignserve's own engine", "lora_path", "unsupported_by_backend")


async def relay(response) -> None:
    """vLLM's refusal as our error (its message, its status)."""
    if response.status_code != 200:
        try:
            err = response.json().get("error") or {}
            message = err.get("message") if isinstance(err, dict) else str(err)
        except ValueError:
            message = response.text
        raise APIError(response.status_code, f"vLLM: {message or response.text}")


def vllm_metric_lines(text: str) -> str:
    """vLLM's own series (`vllm:*`) from its exposition text, to append to ours."""
    keep = [ln for ln in text.splitlines() if ln.startswith("vllm:") or ln.startswith(("# HELP vllm:", "# TYPE vllm:"))]
    return "\n".join(keep) + ("\n" if keep else "")


def build_vllm_app(serving: VLLMServing, model_config, api_key: str | None = None, adapter_root: Path | None = None,
                   limits: Limits = Limits(), retrieval=None, max_num_seqs: int = 64,
                   max_lora_rank: int = 64) -> FastAPI:
    """The HTTP app over `serving` (whose engine is a VLLMClient); the vLLM process is the
    caller's to start and stop."""
    client: VLLMClient = serving.engine
    metrics = serving.metrics
    capacity = max_num_seqs + limits.max_queue_len
    guard = GuardState(api_key=api_key, max_body_bytes=limits.max_body_bytes, admission_paths=GENERATION_PATHS,
                       max_admitted=capacity, metrics=metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await client.aclose()
        if retrieval is not None:
            retrieval.close()

    app = FastAPI(title="alignserve (vllm backend)", version="0.1.0", lifespan=lifespan)
    app.state.guard, app.state.metrics = guard, metrics
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, state=guard)
    app.include_router(adapter_router(serving, model_config, adapter_root, max_lora_rank))
    if retrieval is not None:
        from server.api.routes_retrieval import retrieval_router

        app.include_router(retrieval_router(retrieval))

    @app.get("/health")
    async def health() -> Response:
        if not await client.healthy():
            return JSONResponse({"status": "vllm engine unreachable"}, status_code=503)
        return JSONResponse({"status": "ok", "backend": BACKEND})

    @app.get("/v1/models")
    async def models() -> dict:
        created = now()
        data = [{"id": serving.model_name, "object": "model", "created": created, "owned_by": "alignserve",
                 "root": serving.model_name, "parent": None, "max_model_len": serving.max_model_len}]
        data += [{"id": a.name, "object": "model", "created": created, "owned_by": "alignserve",
                  "root": a.display_path or a.name, "parent": serving.model_name,
                  "max_model_len": serving.max_model_len, "role": a.role} for a in serving.adapters.values()]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def prometheus() -> Response:
        ours = generate_latest(metrics.registry).decode("utf-8")
        try:
            theirs = (await client.http.get("/metrics", timeout=5.0)).text
        except Exception:  # noqa: BLE001 -- our series are still worth serving
            theirs = ""
        return Response(ours + vllm_metric_lines(theirs), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(raw: Request):
        return await _respond("chat", raw)

    @app.post("/v1/completions")
    async def completions(raw: Request):
        return await _respond("completion", raw)

    async def _respond(kind: str, raw: Request):
        prep, params = await asyncio.to_thread(serving.prepare, kind, await raw.body())
        if prep.body.stream:
            source = await serving.open_stream(prep, params)
            return StreamingResponse(serving.stream(prep, params, source), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return await serving.complete(prep, params, raw)

    return app
