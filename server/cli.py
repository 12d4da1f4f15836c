"""Command line: `alignserve serve | index | train | data | bench` (typer)."""
from __future__ import annotations

import logging
import sys
from enum import Enum
from pathlib import Path

import typer

from server.config import GIL_SWITCH_INTERVAL_MS

app = typer.Typer(help="alignserve: OpenAI-compatible server for test-time alignment.", no_args_is_help=True)


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Quantization(str, Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"


class Backend(str, Enum):
    alignserve = "alignserve"
    vllm = "vllm"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@app.command()
def serve(
    host: str = typer.Option("0.0.0.0", help="Interface to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
    model: str = typer.Option("SmolLM2-135M-Instruct", help="Default model name or a local HF model dir."),
    served_model_name: str = typer.Option(None, help="Name clients use in `model` (default: model's name)."),
    api_key: str = typer.Option(None, envvar="ALIGNSERVE_API_KEY", help="Require `Authorization: Bearer KEY`."),
    max_num_seqs: int = typer.Option(64, help="Most sequences in one step."),
    max_num_batched_tokens: int = typer.Option(2048, help="Token budget per step (chunked prefill)."),
    max_model_len: int = typer.Option(2048, help="Most tokens (prompt + output) per sequence."),
    burst_wait_ms: float = typer.Option(0.0, min=0, help="Woken from idle, wait up to this long for a burst of "
                                                         "requests to arrive (until none for 4 ms) so they share "
                                                         "their first step; 0: start at once."),
    prefill_group_tokens: int = typer.Option(512, min=0, help="While several prompts wait, a step's prefill "
                                                            "tokens stop at this many (more as the decode "
                                                            "batch fills, none at max-num-seqs), so a burst "
                                                            "ends in groups and later arrivals start sooner; "
                                                            "0: off."),
    work_token_share: float = typer.Option(1.0, min=0.01, help="Tokens a step gives search methods' work "
                                                               "rows per plain token, when both run."),
    decode_stack: bool = typer.Option(True, help="Run decode steps' decoder layers in one C++ call where the "
                                                 "model and CPU allow (16-bit weights, every row decoding, no "
                                                 "taps); --no-decode-stack keeps the Python layers."),
    block_size: int = typer.Option(16, help="Tokens per KV block."),
    num_kv_blocks: str = typer.Option("auto", help="KV blocks in the pool, or `auto`."),
    dtype: DType = typer.Option(DType.auto, help="Weights/activations dtype."),
    device: Device = typer.Option(Device.auto, help="Where to run the model."),
    quantization: Quantization = typer.Option(Quantization.none, help="Weight-only quantization of the "
                                              "projections and LM head (CPU): int8 per channel, int4 per "
                                              "group of 32."),
    seed: int = typer.Option(0, help="Seed for requests that give none."),
    lora_modules: list[str] = typer.Option(None, help="Adapters to load at start: name=path (repeatable)."),
    adapter_root: Path = typer.Option(None, help="Allow runtime /v1/load_lora_adapter for paths inside DIR."),
    max_loras: int = typer.Option(8, help="LoRA adapters resident in device slots at once."),
    max_lora_rank: int = typer.Option(64, help="Largest LoRA rank accepted."),
    lora_dtype: DType = typer.Option(DType.auto, help="LoRA weights' dtype: auto (the model's; float32 on "
                                     "CPU without the C++ kernels), float32, or the model's dtype (16 bits "
                                     "halve their memory)."),
    no_prefix_caching: bool = typer.Option(False, help="Disable prefix caching."),
    max_body_bytes: int = typer.Option(8 * 1024 * 1024, min=1, help="Largest request body (413 past it)."),
    max_queue_len: int = typer.Option(256, min=0, help="Generation requests admitted beyond --max-num-seqs "
                                                       "(429 with Retry-After past it)."),
    request_timeout: float = typer.Option(600.0, min=0, help="Per-request deadline in seconds (504 past it; "
                                                             "0: none)."),
    shutdown_timeout: float = typer.Option(30.0, min=0, help="On SIGTERM, seconds to let in-flight requests "
                                                             "finish (new ones get 503)."),
    index_root: Path = typer.Option(None, envvar="ALIGNSERVE_INDEX_ROOT",
                                    help="Where RAG collections live (default: ~/.local/share/alignserve/indexes)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    gil_switch_interval_ms: float = typer.Option(GIL_SWITCH_INTERVAL_MS, min=0.01,
                                                 help="How long a Python thread may hold the GIL while another "
                                                      "waits (Python's default: 5)."),
    replicas: int = typer.Option(0, min=0, help="Serve N engine replicas on Ray Serve behind one ingress "
                                                "(needs alignserve[ray]; 0: one in-process server)."),
    ray_address: str = typer.Option(None, help="Ray cluster to deploy the replicas on (default: a local "
                                               "Ray on 127.0.0.1, stopped with the server)."),
    backend: Backend = typer.Option(Backend.alignserve, help="Engine behind the API: ours, or vLLM's (plain, "
                                    "LoRA, RAG; needs alignserve[vllm] or `make vllm`)."),
    tensor_parallel_size: int = typer.Option(1, min=1, help="--backend vllm: GPUs per pipeline stage."),
    pipeline_parallel_size: int = typer.Option(1, min=1, help="--backend vllm: pipeline stages."),
) -> None:
    """Start the OpenAI-compatible HTTP server."""
    from adapters.peft_format import AdapterError, load_peft_adapter
    from server.api import lifecycle
    from server.api.app import Limits, build_app
    from server.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig, kernel_backend
    from server.engine.async_engine import build_off_main_thread
    from server.engine.engine import LLMEngine
    from server.models.default_model import DEFAULT_MODEL_NAME

    logging.basicConfig(level=log_level.upper())
    sys.setswitchinterval(gil_switch_interval_ms / 1000.0)  # why: server.config.GIL_SWITCH_INTERVAL_MS
    if adapter_root is not None and not adapter_root.is_dir():
        raise typer.BadParameter(f"--adapter-root {adapter_root} is not a directory")
    blocks = None if num_kv_blocks == "auto" else int(num_kv_blocks)
    config = EngineConfig(
        model=model, dtype=dtype.value, device=device.value, seed=seed, kernel_backend=kernel_backend(),
        quantization=quantization.value, decode_stack=decode_stack,
        cache=CacheConfig(block_size=block_size, num_kv_blocks=blocks, enable_prefix_caching=not no_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                  max_model_len=max_model_len, work_token_share=work_token_share,
                                  burst_wait_ms=burst_wait_ms, prefill_group_tokens=prefill_group_tokens),
        lora=LoRAConfig(max_loras=max_loras, max_lora_rank=max_lora_rank, lora_dtype=lora_dtype.value),
    )
    from server.scale.vllm_launch import BackendOptions, check_backend_options

    choice = BackendOptions(backend.value, tensor_parallel_size, pipeline_parallel_size, replicas, ray_address,
                            quantization.value, device.value)
    try:
        check_backend_options(choice)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if backend is Backend.vllm:
        from server.scale.vllm_launch import serve_vllm
        from server.scale.vllm_process import VLLMUnavailable

        name = served_model_name or (DEFAULT_MODEL_NAME if model in ("", DEFAULT_MODEL_NAME) else model)
        limits = Limits(max_body_bytes=max_body_bytes, max_queue_len=max_queue_len, request_timeout=request_timeout)
        try:
            return serve_vllm(config, choice, name, api_key, adapter_root, limits, index_root, lora_modules or [],
                              host, port, log_level, shutdown_timeout)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        except VLLMUnavailable as exc:
            typer.echo(f"alignserve: {exc}", err=True)
            raise typer.Exit(1) from exc
    if replicas or ray_address:
        from server.scale.launch import replica_spec, serve_replicas

        name = served_model_name or (DEFAULT_MODEL_NAME if model in ("", DEFAULT_MODEL_NAME) else model)
        limits = Limits(max_body_bytes=max_body_bytes, max_queue_len=max_queue_len, request_timeout=request_timeout)
        spec = replica_spec(config, name, api_key, adapter_root, limits, index_root, lora_modules or [],
                            gil_switch_interval_ms)
        return serve_replicas(spec, max(1, replicas), ray_address, host, port)
    def build_engine() -> LLMEngine:
        try:
            engine = LLMEngine(config)
        except ValueError as exc:  # a flag this model or device cannot take (e.g. --lora-dtype)
            raise typer.BadParameter(str(exc)) from exc
        for spec in lora_modules or []:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise typer.BadParameter(f"--lora-modules expects name=path, got {spec!r}")
            try:
                engine.add_adapter(name, load_peft_adapter(path, engine.model_config, max_lora_rank, name))
            except AdapterError as exc:
                raise typer.BadParameter(f"--lora-modules {name}: {exc.message}") from exc
        return engine

    # Off the main thread: a main thread that ran OpenMP work slows the engine loop's ~2x.
    engine = build_off_main_thread(build_engine)
    name = served_model_name or (DEFAULT_MODEL_NAME if model in ("", DEFAULT_MODEL_NAME) else model)
    quant = "" if quantization is Quantization.none else f", {quantization.value} weights"
    typer.echo(f"alignserve: {name} on {engine.device} ({engine.dtype}{quant}), {engine.num_blocks} KV blocks "
               f"x {engine.block_size} tokens; http://{host}:{port}/v1")
    limits = Limits(max_body_bytes=max_body_bytes, max_queue_len=max_queue_len, request_timeout=request_timeout)
    from retrieval.service import Retrieval, default_root

    retrieval = Retrieval(index_root or default_root(), use_gpu=engine.device.type == "cuda")
    app_ = build_app(engine, name, api_key, adapter_root, limits, retrieval)
    lifecycle.run(app_, host=host, port=port, log_level=log_level, drain_timeout=shutdown_timeout)


def _mount_optional() -> None:
    """Attach sub-apps that live in other packages, if present."""
    from retrieval.cli import index_app

    app.add_typer(index_app, name="index", help="RAG collections on disk (build, ls, search, rm).")
    try:
        from bench.cli import app as bench_app
        app.add_typer(bench_app, name="bench", help="Benchmarks against any OpenAI-compatible server.")
    except ImportError:
        pass
    try:
        from adapters.train.cli import data_app, train_app
        app.add_typer(train_app, name="train", help="Train adapters (SFT, DPO, RM, ARM).")
        app.add_typer(data_app, name="data", help="Generate training data.")
    except ImportError:
        pass


_mount_optional()

if __name__ == "__main__":
    app()
