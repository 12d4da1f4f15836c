"""The load tool's timings against a stub server whose delays are the ground truth (±10 %)."""
from __future__ import annotations

import math
import random

import pytest

from bench.config import LengthSpec, Level, LoadConfig, PromptConfig, Target
from bench.load import run_load_sync
from tests.bench.stub_server import StubConfig, stub_server

TOL = 0.10


def within(measured: float | None, truth: float, tol: float = TOL) -> bool:
    return measured is not None and abs(measured - truth) <= tol * truth


def make_cfg(url: str, **kw: object) -> LoadConfig:
    prompts = PromptConfig(input_len=LengthSpec(16, 16), max_tokens=10)
    return LoadConfig(targets=(Target("stub", url),), prompts=prompts, progress=False, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("endpoint", "concurrency"), [("chat", (1, 4)), ("completions", (4,))])
def test_timings_and_throughput_match_stub(endpoint: str, concurrency: tuple[int, ...]) -> None:
    # NOTE: TTFT includes the loopback round trip and HTTP handling of both sides in this one
    # process (up to ~20 ms on a busy 2-core machine), so the nominal TTFT is long enough for
    # that to stay well inside 10 %.
    stub = StubConfig(ttft=0.300, itl=0.020, num_tokens=10)
    levels = tuple(Level(concurrency=c) for c in concurrency)
    with stub_server(stub) as (url, log):
        results = run_load_sync(make_cfg(url, levels=levels, num_requests=4, warmup=2,
                                         endpoint=endpoint))
    assert len(log.bodies) == 2 + len(levels) * 4  # warm-up + each level
    assert all(("messages" if endpoint == "chat" else "prompt") in b for b in log.bodies)
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in log.bodies)
    # No token is seen before the stub sent it.
    stub_ttfts = [sends[0] - arrived for arrived, sends in zip(log.arrivals, log.sends)]
    assert min(r.ttft or 0.0 for res in results for r in res.records) >= min(stub_ttfts)
    for result in results:
        s = result.summary
        assert s["completed"] == 4 and s["errors"] == {}
        assert within(s["ttft_ms"]["p50"], 300.0), s["ttft_ms"]
        assert within(s["itl_ms"]["mean"], 20.0), s["itl_ms"]
        assert within(s["tpot_ms"]["mean"], 20.0), s["tpot_ms"]
        assert within(s["e2e_ms"]["p50"], 480.0), s["e2e_ms"]
        waves = math.ceil(4 / (result.level.concurrency or 1))
        assert within(s["output_throughput"], 4 * 10 / (waves * 0.480)), s["output_throughput"]
        for r in result.records:
            assert (r.output_tokens, r.output_tokens_source, r.prompt_tokens) == (10, "usage", 7)
            assert len(r.itl) == 9 and r.num_chunks == 10


def test_multi_token_chunks_spread_itl_by_usage() -> None:
    # 10 tokens in 5 chunks of 2, 40 ms apart: each gap counts as two 20 ms ITLs.
    stub = StubConfig(ttft=0.100, itl=0.020, num_tokens=10, tokens_per_chunk=2)
    with stub_server(stub) as (url, _):
        [result] = run_load_sync(make_cfg(url, num_requests=4))
    s = result.summary
    assert within(s["itl_ms"]["p50"], 20.0), s["itl_ms"]
    assert within(s["tpot_ms"]["mean"], 160.0 / 9), s["tpot_ms"]  # (e2e - ttft) / (10 - 1)
    assert all(len(r.itl) == 8 and r.num_chunks == 5 for r in result.records)


def test_without_usage_counts_chunks() -> None:
    with stub_server(StubConfig(itl=0.005, ttft=0.01, include_usage=False)) as (url, _):
        [result] = run_load_sync(make_cfg(url, num_requests=3))
    assert all((r.output_tokens, r.output_tokens_source) == (10, "chunks") for r in result.records)
    assert all(r.prompt_tokens == 16 for r in result.records)  # the prompt's own estimate


def test_request_rates_and_cap() -> None:
    with stub_server(StubConfig()) as (url, _):
        results = run_load_sync(make_cfg(url, num_requests=8, levels=(
            Level(request_rate=math.inf), Level(request_rate=math.inf, max_concurrency=4),
            Level(request_rate=50.0))))
    unlimited, capped, poisson = results
    assert all(r.summary["completed"] == 8 for r in results)
    # All at once: one request's time, not eight. Capped at 4: two waves, never three.
    assert 0.280 <= unlimited.summary["duration_s"] < 0.280 * 1.8
    assert 0.560 <= capped.summary["duration_s"] < 0.280 * 3
    assert max(r.start for r in unlimited.records) < 0.05
    # Poisson arrivals follow the seeded exponential gaps.
    rng = random.Random(0)
    gaps = [rng.expovariate(50.0) for _ in range(7)]
    starts = sorted(r.start for r in poisson.records)
    assert abs((starts[-1] - starts[0]) - sum(gaps)) < 0.1 * sum(gaps) + 0.01


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
