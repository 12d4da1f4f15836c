"""`alignserve serve --backend vllm`: check the options, start vLLM, serve our app over it, stop it.

In: the CLI's options. Out: our HTTP server on --host/--port in front of a vLLM child process
on a free loopback port (vllm_process.py), stopped with the server. Does not: serve requests
(vllm_backend.py).
"""
from __future__ import annotations

import logging
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from server.api.app import Limits
from server.config import EngineConfig, cache_dir

logger = logging.getLogger(__name__)
BACKENDS = ("alignserve", "vllm")


@dataclass(frozen=True)
class BackendOptions:
    """The serve options that choose and shape the backend (the rest go to EngineConfig)."""

    backend: str = "alignserve"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    replicas: int = 0
    ray_address: str | None = None
    quantization: str = "none"
    device: str = "auto"


def check_backend_options(opts: BackendOptions) -> None:
    """Refuse combinations no backend serves.

    Raises:
        ValueError: naming the option, e.g. parallelism asked of our own engine.
    """
    if opts.backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, not {opts.backend!r}")
    if opts.tensor_parallel_size < 1 or opts.pipeline_parallel_size < 1:
        raise ValueError("--tensor-parallel-size and --pipeline-parallel-size must be >= 1")
    if opts.backend == "alignserve":
        if opts.tensor_parallel_size != 1 or opts.pipeline_parallel_size != 1:
            raise ValueError("--tensor-parallel-size / --pipeline-parallel-size need --backend vllm: "
                             "alignserve's own engine runs on one device (scale it out with --replicas)")
        return
    if opts.replicas or opts.ray_address:
        raise ValueError("--backend vllm scales with --tensor-parallel-size / --pipeline-parallel-size, "
                         "not --replicas / --ray-address (those replicate alignserve's own engine)")
    if opts.quantization != "none":
        raise ValueError(f"--quantization {opts.quantization} is alignserve's own engine's; the vllm "
                         "backend serves the model's own weights")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_vllm(config: EngineConfig, opts: BackendOptions, model_name: str, api_key: str | None,
               adapter_root: Path | None, limits: Limits, index_root: Path | None, lora_modules: list[str],
               host: str, port: int, log_level: str, drain_timeout: float) -> None:
    """Start vLLM, then serve our app over it until SIGTERM; vLLM is stopped on the way out."""
    import torch

    from adapters.errors import AdapterError
    from adapters.peft_format import load_peft_adapter
    from retrieval.service import Retrieval, default_root
    from server.api import lifecycle
    from server.engine.metrics import ServerMetrics
    from server.engine.tokenizer import Tokenizer
    from server.models.config import ModelConfig
    from server.models.default_model import resolve_model
    from server.scale.vllm_backend import ServedAdapter, VLLMServing, build_vllm_app, check_role
    from server.scale.vllm_client import VLLMClient
    from server.scale.vllm_process import VLLMOptions, VLLMProcess

    model_dir = resolve_model(config.model).resolve()
    model_config = ModelConfig.from_pretrained(model_dir)
    adapters: list[ServedAdapter] = []
    modules: list[tuple[str, Path]] = []
    for item in lora_modules:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules expects name=path, got {item!r}")
        try:
            weights = load_peft_adapter(path, model_config, config.lora.max_lora_rank, name)
        except AdapterError as exc:
            raise ValueError(f"--lora-modules {name}: {exc.message}") from exc
        check_role(weights.role)
        modules.append((name, weights.path.resolve()))
        adapters.append(ServedAdapter(name, len(adapters) + 1, weights.role, weights.rank, weights.display_path))
    on_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    max_len = min(config.scheduler.max_model_len, model_config.max_position_embeddings)
    vopts = VLLMOptions(model_dir, model_name, config.dtype, max_len, config.scheduler.max_num_seqs,
                        config.scheduler.max_num_batched_tokens, opts.tensor_parallel_size,
                        opts.pipeline_parallel_size, config.lora.max_loras, config.lora.max_lora_rank,
                        tuple(modules), config.seed, config.cache.enable_prefix_caching, on_gpu,
                        config.cache.cpu_kv_bytes, config.cache.memory_fraction)
    log_path = cache_dir() / "logs" / "vllm-backend.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: until uvicorn installs its own handlers, SIGTERM must unwind through `finally`,
    # or the vLLM child (its own session) would outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    process = VLLMProcess(vopts, free_port(), log_path)
    try:
        logger.info("vLLM starting (log: %s)", log_path)
        ready_s = process.wait_ready()
        retrieval = Retrieval(index_root or default_root(), use_gpu=on_gpu)
        serving = VLLMServing(VLLMClient(process.base_url, model_name, limits.request_timeout or None),
                              Tokenizer(model_dir), model_name, ServerMetrics(), max_len, model_config.vocab_size,
                              limits.request_timeout, retrieval)
        serving.adapters.update({a.name: a for a in adapters})
        app = build_vllm_app(serving, model_config, api_key, adapter_root, limits, retrieval,
                             config.scheduler.max_num_seqs, config.lora.max_lora_rank)
        print(f"alignserve: {model_name} on vLLM (tp {opts.tensor_parallel_size}, pp {opts.pipeline_parallel_size}, "
              f"ready in {ready_s:.0f} s, {process.base_url}); http://{host}:{port}/v1", flush=True)
        lifecycle.run(app, host=host, port=port, log_level=log_level, drain_timeout=drain_timeout)
    finally:
        process.stop()
