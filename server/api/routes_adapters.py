"""vLLM-compatible runtime LoRA routes: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

The adapter directory and every file read from it must resolve (after symlinks) inside
`--adapter-root` (adapters/adapter_files.py); without a root, runtime loading is refused (403),
as in vLLM where it must be switched on. Error messages and the response name the adapter
relative to the root, never by an absolute server path. Weights are read and validated off
the engine thread; only the cheap registration runs between engine steps. Unloading an adapter
that live requests use answers 409 (the client retries) rather than blocking.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter
from pydantic import BaseModel, Field

from server.api import schemas
from server.api.protocol import STRICT

from adapters.errors import AdapterError
from adapters.peft_format import load_peft_adapter
from server.api.errors import APIError
from server.engine.async_engine import AsyncEngine


# NOTE: PATH_MAX is 4096 on Linux; a longer lora_path can only fail, so it is refused as a 400 up front.
MAX_LORA_PATH = 4096


class LoadLoRARequest(BaseModel):
    model_config = STRICT

    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1, max_length=MAX_LORA_PATH)


class UnloadLoRARequest(BaseModel):
    model_config = STRICT

    lora_name: str = Field(min_length=1, max_length=200)


def adapter_router(engine: AsyncEngine, base_name: str, adapter_root: Path | None,
                   dependencies: list) -> APIRouter:
    router = APIRouter(dependencies=dependencies)
    model_config = engine.engine.model_config
    max_rank = engine.engine.adapters.max_rank

    @router.post("/v1/load_lora_adapter",
                 responses=schemas.documented(schemas.LoRALoaded, *schemas.COMMON, 400, 403, 413))
    async def load(body: LoadLoRARequest) -> dict:
        if body.lora_name == base_name:
            raise APIError(400, f"`{body.lora_name}` is the base model's name", "lora_name")
        if adapter_root is None:
            raise APIError(403, "runtime adapter loading is disabled; start the server with --adapter-root DIR",
                           "lora_path", "adapter_loading_disabled")
        try:
            weights = await asyncio.to_thread(load_peft_adapter, body.lora_path, model_config, max_rank,
                                              body.lora_name, adapter_root)
            adapter_id = await engine.call(lambda e: e.add_adapter(body.lora_name, weights))
        except AdapterError as exc:
            code = "path_not_allowed" if exc.status == 403 else None
            raise APIError(exc.status, exc.message, exc.param, code) from exc
        return {"object": "lora_adapter", "id": body.lora_name, "adapter_id": adapter_id,
                "role": weights.role, "rank": weights.rank, "path": weights.display_path,
                "message": f"Success: LoRA adapter '{body.lora_name}' added successfully."}

    @router.post("/v1/unload_lora_adapter",
                 responses=schemas.documented(schemas.LoRALoaded, *schemas.COMMON, 400, 404, 409, 413))
    async def unload(body: UnloadLoRARequest) -> dict:
        try:
            await engine.call(lambda e: e.remove_adapter(body.lora_name))
        except AdapterError as exc:
            raise APIError(exc.status, exc.message, exc.param) from exc
        return {"object": "lora_adapter", "id": body.lora_name, "deleted": True,
                "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}

    return router
