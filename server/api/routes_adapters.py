"""vLLM-compatible runtime LoRA routes: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

Paths must resolve (after symlinks) inside `--adapter-root`; without one, runtime loading
is refused (403), as in vLLM where it must be switched on. Weights are read and validated
off the engine thread; only the cheap registration runs between engine steps. Unloading
an adapter that live requests use answers 409 (the client retries) rather than blocking.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter
from pydantic import BaseModel, Field

from adapters.peft_format import AdapterError, load_peft_adapter
from server.api.errors import APIError
from server.engine.async_engine import AsyncEngine


class LoadLoRARequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1)


class UnloadLoRARequest(BaseModel):
    lora_name: str = Field(min_length=1)


def resolve_inside(root: Path | None, lora_path: str) -> Path:
    """The adapter dir for `lora_path`, which must resolve inside `root` (else 403)."""
    if root is None:
        raise APIError(403, "runtime adapter loading is disabled; start the server with --adapter-root DIR",
                       "lora_path", "adapter_loading_disabled")
    root = root.resolve()
    candidate = Path(lora_path).expanduser()
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if path != root and root not in path.parents:
        raise APIError(403, f"lora_path must be inside the adapter root {root}", "lora_path", "path_not_allowed")
    return path


def adapter_router(engine: AsyncEngine, base_name: str, adapter_root: Path | None,
                   dependencies: list) -> APIRouter:
    router = APIRouter(dependencies=dependencies)
    model_config = engine.engine.model_config
    max_rank = engine.engine.adapters.max_rank

    @router.post("/v1/load_lora_adapter")
    async def load(body: LoadLoRARequest) -> dict:
        if body.lora_name == base_name:
            raise APIError(400, f"`{body.lora_name}` is the base model's name", "lora_name")
        path = resolve_inside(adapter_root, body.lora_path)
        try:
            weights = await asyncio.to_thread(load_peft_adapter, path, model_config, max_rank, body.lora_name)
            adapter_id = await engine.call(lambda e: e.add_adapter(body.lora_name, weights))
        except AdapterError as exc:
            raise APIError(exc.status, exc.message, exc.param) from exc
        return {"object": "lora_adapter", "id": body.lora_name, "adapter_id": adapter_id,
                "role": weights.role, "rank": weights.rank,
                "message": f"Success: LoRA adapter '{body.lora_name}' added successfully."}

    @router.post("/v1/unload_lora_adapter")
    async def unload(body: UnloadLoRARequest) -> dict:
        try:
            await engine.call(lambda e: e.remove_adapter(body.lora_name))
        except AdapterError as exc:
            raise APIError(exc.status, exc.message, exc.param) from exc
        return {"object": "lora_adapter", "id": body.lora_name, "deleted": True,
                "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}

    return router
