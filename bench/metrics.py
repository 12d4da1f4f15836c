"""Per-request records and their aggregates (TTFT, ITL, TPOT, E2E, throughput, goodput).

In: `RequestRecord`s from `bench.client`, the wall time of their level, the SLOs.
Out: a JSON-ready summary dict (latencies in ms, throughputs per second).
Does not: send requests, print or plot (see `bench.report`).

Definitions (same as vLLM's `bench serve`):
- TTFT: request sent → first chunk with content.
- ITL: gaps between content chunks; a chunk carrying k tokens contributes k gaps of gap/k.
- TPOT: (e2e - ttft) / (output_tokens - 1), per request; undefined for one output token.
- Throughput: over the level's wall time, counting successful requests only.
- Goodput: successful requests per second that meet every SLO given.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestRecord:
    """One request's outcome; times are seconds, `start` relative to the level's start."""

    index: int
    session: int
    turn: int
    start: float
    e2e: float
    ttft: float | None
    itl: tuple[float, ...]
    prompt_tokens: int
    output_tokens: int
    output_tokens_source: str  # "usage" | "tokenizer" | "chunks"
    num_chunks: int
    error: str | None = None  # "http_500", "timeout", "connection", "empty_output", ...
    error_detail: str | None = None

    @property
    def ok(self) -> bool:
        """True for a request that ended normally with some output."""
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None when undefined."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        """Plain dict with latencies in ms."""
        ms = _ms
        return {
            "index": self.index, "session": self.session, "turn": self.turn,
            "start_s": round(self.start, 6), "ok": self.ok, "error": self.error,
            "error_detail": self.error_detail, "ttft_ms": ms(self.ttft), "tpot_ms": ms(self.tpot),
            "e2e_ms": ms(self.e2e), "itl_ms": [ms(x) for x in self.itl],
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
            "output_tokens_source": self.output_tokens_source, "num_chunks": self.num_chunks,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 4)


def split_tokens(weights: list[int], total: int) -> list[int]:
    """Spread `total` tokens over chunks in proportion to `weights`, at least one per chunk.

    Largest-remainder rounding keeps the sum exact. With `total` <= number of chunks every
    chunk counts one token (a server whose usage undercounts its own chunks).
    """
    n = len(weights)
    if n == 0:
        return []
    extra = total - n
    if extra <= 0:
        return [1] * n
    weight_sum = sum(max(w, 0) for w in weights)
    if weight_sum <= 0:
        weights, weight_sum = [1] * n, n
    shares = [max(w, 0) * extra / weight_sum for w in weights]
    counts = [1 + math.floor(s) for s in shares]
    short = total - sum(counts)
    by_remainder = sorted(range(n), key=lambda i: shares[i] - math.floor(shares[i]), reverse=True)
    for i in by_remainder[:short]:
        counts[i] += 1
    return counts


def inter_token_latencies(chunk_times: list[float], tokens_per_chunk: list[int]) -> list[float]:
    """ITLs from content-chunk arrival times: gap j is split evenly over chunk j's tokens.

    NOTE: extra tokens in the first chunk arrived with the first token and add no ITL.
    """
    itl: list[float] = []
    for j in range(1, len(chunk_times)):
        k = max(tokens_per_chunk[j], 1)
        itl.extend([(chunk_times[j] - chunk_times[j - 1]) / k] * k)
    return itl


def stats_ms(values: list[float]) -> dict[str, float | None]:
    """mean, std and percentiles of seconds, in ms; Nones for an empty list."""
    keys = ["mean", "std"] + [f"p{p}" for p in PERCENTILES]
    if not values:
        return dict.fromkeys(keys)
    arr = np.asarray(values, dtype=np.float64) * 1000.0
    out = {"mean": float(arr.mean()), "std": float(arr.std())}
    out.update({f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES})
    return {k: round(v, 4) for k, v in out.items()}


def meets_slo(record: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """A successful request within every SLO given; a request without TPOT passes that SLO."""
    if not record.ok or record.ttft is None:
        return False
    if slo_ttft_ms is not None and record.ttft * 1000.0 > slo_ttft_ms:
        return False
    tpot = record.tpot
    return slo_tpot_ms is None or tpot is None or tpot * 1000.0 <= slo_tpot_ms


def summarize(records: list[RequestRecord], duration: float, num_not_started: int = 0,
              slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> dict[str, Any]:
    """Aggregates of one level; latency stats use successful requests only."""
    good = [r for r in records if r.ok]
    errors = Counter(r.error for r in records if r.error is not None)
    if num_not_started:
        errors["not_started"] += num_not_started
    wall = max(duration, 1e-9)
    output_tokens = sum(r.output_tokens for r in good)
    input_tokens = sum(r.prompt_tokens for r in good)
    total = len(records) + num_not_started
    has_slo = slo_ttft_ms is not None or slo_tpot_ms is not None
    num_good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in good) if has_slo else None
    return {
        "num_requests": total,
        "completed": len(good),
        "failed": len(records) - len(good) + num_not_started,
        "errors": dict(sorted(errors.items())),
        "duration_s": round(duration, 6),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": round(len(good) / wall, 4),
        "output_throughput": round(output_tokens / wall, 4),
        "total_token_throughput": round((input_tokens + output_tokens) / wall, 4),
        "goodput": None if num_good is None else round(num_good / wall, 4),
        "slo_attainment": None if num_good is None or not total else round(num_good / total, 4),
        "ttft_ms": stats_ms([r.ttft for r in good if r.ttft is not None]),
        "itl_ms": stats_ms([x for r in good for x in r.itl]),
        "tpot_ms": stats_ms([t for r in good if (t := r.tpot) is not None]),
        "e2e_ms": stats_ms([r.e2e for r in good]),
    }
