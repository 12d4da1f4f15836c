"""Aggregation math: token splitting across chunks, ITL, TPOT, percentiles, goodput."""
from __future__ import annotations

import pytest

from bench.metrics import RequestRecord, inter_token_latencies, split_tokens, summarize


def record(ttft: float, e2e: float, out: int, error: str | None = None) -> RequestRecord:
    return RequestRecord(index=0, session=0, turn=0, start=0.0, e2e=e2e, ttft=ttft, itl=(),
                         prompt_tokens=4, output_tokens=out, output_tokens_source="usage",
                         num_chunks=out, error=error)


def test_split_tokens() -> None:
    assert split_tokens([3, 3, 3], 3) == [1, 1, 1]
    assert split_tokens([3, 3, 3], 2) == [1, 1, 1]  # usage below chunk count: one each
    assert split_tokens([1, 1, 1, 1], 8) == [2, 2, 2, 2]
    assert split_tokens([1, 3], 6) == [2, 4]
    assert sum(split_tokens([5, 1, 7, 2], 23)) == 23
    assert split_tokens([], 4) == []


def test_inter_token_latencies_split_gaps() -> None:
    itl = inter_token_latencies([0.0, 0.1, 0.3], [1, 1, 2])
    assert itl == pytest.approx([0.1, 0.1, 0.1])


def test_summary_goodput_and_tpot() -> None:
    records = [record(0.1, 1.0, 10), record(0.5, 1.0, 10), record(0.1, 2.0, 10),
               record(0.1, 0.1, 1), record(0.0, 0.0, 0, error="http_500")]
    s = summarize(records, duration=2.0, num_not_started=1, slo_ttft_ms=200, slo_tpot_ms=150)
    assert (s["num_requests"], s["completed"], s["failed"]) == (6, 4, 2)
    assert s["errors"] == {"http_500": 1, "not_started": 1}
    assert s["request_throughput"] == 2.0 and s["output_throughput"] == 15.5
    # The 2nd misses the TTFT SLO, the 3rd the TPOT one (1.9 s / 9); one token has no TPOT.
    assert s["goodput"] == 1.0 and s["slo_attainment"] == pytest.approx(2 / 6, abs=1e-4)
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert summarize(records, 2.0)["goodput"] is None


def test_summary_of_nothing() -> None:
    s = summarize([], 0.0, num_not_started=3)
    assert s["completed"] == 0 and s["errors"] == {"not_started": 3}
    assert s["e2e_ms"] == {"mean": None, "std": None, "p50": None, "p90": None, "p99": None}
