"""The load tool's timings against a stub server whose delays are the ground truth.

NOTE: every bound here holds on a loaded machine. Lower bounds are strict: the stub's sleeps
never end early and no chunk is seen before it is sent. Upper bounds sit below the nearest
wrong answer (a request timed from its level's start, or queued behind another one), never
at a guess of how fast this machine is, and concurrency is checked by the order of events.
"""
from __future__ import annotations

import math
import random
import statistics

import pytest

from bench.config import LengthSpec, Level, LoadConfig, PromptConfig, Target
from bench.load import run_load_sync
from bench.metrics import RequestRecord
from tests.bench.stub_server import StubConfig, stub_server

# asyncio may wake a timer one clock tick (~1 ns) early; a millisecond covers it and float sums.
EARLY = 1e-3
# How late a reply may be seen on a loaded 2-core machine; below every stub's whole request
# time (>= 0.48 s here), so a request timed from its level's start or queued behind another
# one still falls outside.
SLACK = 0.4


def make_cfg(url: str, **kw: object) -> LoadConfig:
    prompts = PromptConfig(input_len=LengthSpec(16, 16), max_tokens=10)
    return LoadConfig(targets=(Target("stub", url),), prompts=prompts, progress=False, **kw)  # type: ignore[arg-type]


def max_in_flight(records: tuple[RequestRecord, ...]) -> int:
    """Most requests open at one instant, from each record's [start, start + e2e]."""
    events = sorted([(r.start, 1) for r in records] + [(r.start + r.e2e, -1) for r in records],
                    key=lambda e: (e[0], e[1]))  # an end at the same instant closes first
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def check_last_token_bounds(r: RequestRecord, last_sent: float) -> None:
    """The last token is seen after the stub sent it (>= `last_sent`) and before the end."""
    assert r.ttft is not None
    last_seen = r.ttft + sum(r.itl)  # ITLs add up to last chunk - first chunk
    assert last_sent - EARLY <= last_seen <= r.e2e + 1e-9, (last_seen, r)


def check_summary_matches_records(s: dict, records: tuple[RequestRecord, ...], duration: float) -> None:
    """The summary aggregates exactly these records (the level's own arithmetic)."""
    ms = 1000.0
    assert s["ttft_ms"]["p50"] == pytest.approx(statistics.median(r.ttft for r in records) * ms, abs=1e-3)
    assert s["e2e_ms"]["p50"] == pytest.approx(statistics.median(r.e2e for r in records) * ms, abs=1e-3)
    assert s["itl_ms"]["mean"] == pytest.approx(statistics.mean(x for r in records for x in r.itl) * ms, abs=1e-3)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in records]
    assert s["tpot_ms"]["mean"] == pytest.approx(statistics.mean(tpots) * ms, abs=1e-3)
    tokens = sum(r.output_tokens for r in records)
    assert s["output_throughput"] == pytest.approx(tokens / duration, rel=1e-5)


@pytest.mark.parametrize(("endpoint", "concurrency"), [("chat", (1, 4)), ("completions", (4,))])
def test_timings_and_throughput_match_stub(endpoint: str, concurrency: tuple[int, ...]) -> None:
    ttft, itl, n = 0.300, 0.020, 10
    e2e = ttft + (n - 1) * itl  # when the stub sends the last token
    levels = tuple(Level(concurrency=c) for c in concurrency)
    with stub_server(StubConfig(ttft=ttft, itl=itl, num_tokens=n)) as (url, log):
        results = run_load_sync(make_cfg(url, levels=levels, num_requests=4, warmup=2,
                                         endpoint=endpoint))
    assert len(log.bodies) == 2 + len(levels) * 4  # warm-up + each level
    assert all(("messages" if endpoint == "chat" else "prompt") in b for b in log.bodies)
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in log.bodies)
    for result in results:
        s, records = result.summary, result.records
        assert s["completed"] == 4 and s["errors"] == {}
        for r in records:
            assert (r.output_tokens, r.output_tokens_source, r.prompt_tokens) == (10, "usage", 7)
            assert len(r.itl) == 9 and r.num_chunks == 10
            # The chat stub's role-only first chunk must not count: it comes at once.
            assert ttft - EARLY <= r.ttft <= ttft + SLACK, r
            assert e2e - EARLY <= r.e2e <= e2e + SLACK, r
            check_last_token_bounds(r, e2e)
        check_summary_matches_records(s, records, s["duration_s"])
        assert s["duration_s"] >= math.ceil(4 / result.level.concurrency) * e2e - EARLY
        if result.level.concurrency == 1:
            # One client: each request starts after the previous one ended.
            assert all(b.start >= a.start + a.e2e - 1e-9 for a, b in zip(records, records[1:]))
        else:
            assert max_in_flight(records) == 4  # every request started before any ended


def test_multi_token_chunks_spread_itl_by_usage() -> None:
    # 10 tokens in 5 chunks of 2, 40 ms apart: each gap counts as two equal ITLs.
    stub = StubConfig(ttft=0.100, itl=0.020, num_tokens=10, tokens_per_chunk=2)
    with stub_server(stub) as (url, _):
        [result] = run_load_sync(make_cfg(url, num_requests=4))
    for r in result.records:
        assert len(r.itl) == 8 and r.num_chunks == 5
        assert all(r.itl[k] == r.itl[k + 1] for k in range(0, 8, 2)), r.itl
        assert 0.100 - EARLY <= r.ttft <= 0.100 + SLACK
        check_last_token_bounds(r, 0.100 + 4 * 0.040)
    check_summary_matches_records(result.summary, result.records, result.summary["duration_s"])


def test_without_usage_counts_chunks() -> None:
    with stub_server(StubConfig(itl=0.005, ttft=0.01, include_usage=False)) as (url, _):
        [result] = run_load_sync(make_cfg(url, num_requests=3))
    assert all((r.output_tokens, r.output_tokens_source) == (10, "chunks") for r in result.records)
    assert all(r.prompt_tokens == 16 for r in result.records)  # the prompt's own estimate


def test_request_rates_and_cap() -> None:
    stub = StubConfig()  # 0.1 s to the first token, 0.28 s a request
    rate = 10.0
    with stub_server(stub) as (url, _):
        results = run_load_sync(make_cfg(url, num_requests=8, levels=(
            Level(request_rate=math.inf), Level(request_rate=math.inf, max_concurrency=4),
            Level(request_rate=rate))))
    unlimited, capped, poisson = results
    assert all(r.summary["completed"] == 8 for r in results)
    # All at once: every request in flight together. Capped at 4: never five, so two waves.
    assert max_in_flight(unlimited.records) == 8
    assert max_in_flight(capped.records) == 4
    assert capped.summary["duration_s"] >= 2 * 0.28 - EARLY
    # Poisson arrivals follow the seeded exponential gaps (at 10/s they differ from evenly
    # spaced ones by more than the lower bound's tolerance, so a fixed period fails).
    rng = random.Random(0)  # the level's seed
    offsets = [0.0]
    for _ in range(7):
        offsets.append(offsets[-1] + rng.expovariate(rate))
    starts = sorted(r.start for r in poisson.records)
    for k in range(1, 8):
        seen = starts[k] - starts[0]
        # Lower: sleeps never end early (less the moment the first request took to start).
        # Upper: each of the k sleeps may wake late on a loaded machine.
        assert offsets[k] - 0.05 <= seen <= offsets[k] + 0.05 * k, (k, seen, offsets[k])


def test_multiturn_appends_server_replies() -> None:
    prompts = PromptConfig(prompt_set="multiturn", num_turns=3, input_len=LengthSpec(20, 20),
                           max_tokens=10)
    stub = StubConfig(ttft=0.01, itl=0.002)
    with stub_server(stub) as (url, log):
        cfg = LoadConfig(targets=(Target("stub", url),), prompts=prompts, num_requests=6,
                         levels=(Level(concurrency=2),), progress=False)
        [result] = run_load_sync(cfg)
    assert result.summary["completed"] == 6
    assert sorted(len(b["messages"]) for b in log.bodies) == [1, 1, 3, 3, 5, 5]
    reply = "".join(f" tok{i}" for i in range(10))
    for body in log.bodies:
        roles = [m["role"] for m in body["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
        assert all(m["content"] == reply for m in body["messages"] if m["role"] == "assistant")
    assert sorted((r.session, r.turn) for r in result.records) == [
        (s, t) for s in range(2) for t in range(3)]
