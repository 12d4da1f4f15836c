"""Configuration: frozen dataclasses for each component, and the one place env vars are read."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def cache_dir() -> Path:
    """Root of alignserve's on-disk cache (`ALIGNSERVE_CACHE`, default ~/.cache/alignserve)."""
    root = os.environ.get("ALIGNSERVE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "alignserve"


def kernel_backend() -> str:
    """Kernel choice forced by `ALIGNSERVE_KERNELS` (auto|triton|torch)."""
    return os.environ.get("ALIGNSERVE_KERNELS", "auto")


# How long one Python thread may keep the GIL while another waits (`sys.setswitchinterval`),
# set by every process that serves (`serve`, Ray replicas). The engine thread releases the GIL
# inside every torch op and needs it back to start the next, while the event loop's thread,
# streaming chunks, may hold it meanwhile for up to the interval: at Python's 5 ms that wait lands
# on the model step. At 0.5 ms interleaved A/Bs gave c = 4 / 16 / 64 tokens/s +20 / +9 / +7 %
# (bench/results/peers_interleaved_2026-12-06_0daf137.json, whose alignserve-gil5 entry runs 5 ms)
# and c = 16 / 64 +18 / +16 % (bench/results/serve_ab_gil_switch_pilot_2026-12-06.*).
GIL_SWITCH_INTERVAL_MS = 0.5


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing."""

    block_size: int = 16
    num_kv_blocks: int | None = None  # None: derive from memory_fraction
    memory_fraction: float = 0.9  # of free accelerator memory; on CPU a fixed budget below
    cpu_kv_bytes: int = 2 * 1024**3
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    # In a step that also runs plain rows, search methods' work rows (branches, evaluations,
    # scoring passes) may feed at most this many tokens per plain token. 1.0 keeps a plain
    # stream's time per token within about 2x of running alone (bench/search_fairness.py).
    work_token_share: float = 1.0
    # Woken from idle by a request, the engine keeps admitting requests until none has come
    # for burst_gap_ms, or burst_wait_ms has passed, before its first step: a burst of prompts
    # (a closed-loop wave, a batch client) then shares one prefill instead of the first few
    # taking a step of their own while the rest queue behind it. The cost is up to
    # burst_gap_ms of TTFT for a lone request. Off (0) by default: in-process the first step of
    # a 16-prompt wave took 1-4 prompts alone (ad-hoc, unrecorded: 60-260 ms the rest waited),
    # but two served A/Bs on a drifting VM could not tell it from noise
    # (bench/results/serve_ab_burst_2026-12-06.*, the alignserve-noburst rows of peers.json).
    burst_wait_ms: float = 0.0
    burst_gap_ms: float = 4.0
    # While more than one prompt waits, a step's prefill tokens (continuing chunks and new
    # admissions) stop at this many, or more as the step's decode rows fill the batch (the whole
    # budget at max_num_seqs); a lone prompt still takes the whole budget. 0: off. Why and what
    # it measured: Scheduler._prefill_group_left, bench/results/serve_ab_prefill_group_* and
    # serve_waves_2026-12-06.
    prefill_group_tokens: int = 512


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving limits."""

    max_loras: int = 8  # adapters resident in device slots at once
    max_lora_rank: int = 64
    lora_dtype: str = "auto"  # the stacks' dtype: adapters.registry.stack_dtype


@dataclass(frozen=True)
class EngineConfig:
    """Everything LLMEngine needs to start."""

    model: str
    dtype: str = "auto"  # auto|float32|bfloat16|float16
    device: str = "auto"  # auto|cpu|cuda
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    kernel_backend: str = "auto"
    quantization: str = "none"  # none|int8|int4: weight-only, CPU (server.models.linear)
    decode_stack: bool = True  # decode steps' layers in one C++ call where it can (server.models.cpu_stack)


@dataclass(frozen=True)
class ServerConfig:
    """HTTP front settings."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
