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
    # admissions) stop at this many: a wave of prompts then finishes in groups, each group's
    # first tokens out after its own prefill instead of the whole wave's. A lone prompt still
    # takes the whole budget. 0: admit up to max_num_batched_tokens. A burst itself gains
    # little (small steps cost more per token), but it then ends in groups a step apart, so a
    # closed loop's next arrivals come a few at a time and start in the next step instead of
    # waiting together for one big step (bench/results/serve_waves_2026-12-06: later requests'
    # TTFT p50 580/234/349 vs 1022/559/615 ms). Interleaved with vLLM
    # (serve_ab_prefill_group_*): c = 16 TTFT p50 531 vs 924 ms off and 1020 vLLM; throughput
    # -9 % in a 32-request run (the staggered ends thin its last steps), +5 % over 128.
    prefill_group_tokens: int = 512


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving limits."""

    max_loras: int = 8  # adapters resident in device slots at once
    max_lora_rank: int = 64


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


@dataclass(frozen=True)
class ServerConfig:
    """HTTP front settings."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
