"""Server faults become counted errors, never crashes; `timeout` bounds the whole run."""
from __future__ import annotations

import time

from bench.config import LengthSpec, Level, LoadConfig, PromptConfig, Target
from bench.load import run_load_sync
from tests.bench.stub_server import StubConfig, closed_port, stub_server

PROMPTS = PromptConfig(input_len=LengthSpec(8, 8), max_tokens=10)
EARLY = 1e-3  # asyncio may fire a timeout one clock tick (~1 ns) early


def make_cfg(*targets: Target, **kw: object) -> LoadConfig:
    return LoadConfig(targets=targets, prompts=PROMPTS, progress=False, **kw)  # type: ignore[arg-type]


def test_http_errors_and_refused_connections_are_counted() -> None:
    dead = Target("dead", f"http://127.0.0.1:{closed_port()}/v1")
    with stub_server(StubConfig(ttft=0.01, itl=0.002, fail_every=2)) as (url, _):
        flaky, refused = run_load_sync(make_cfg(Target("flaky", url), dead, num_requests=6,
                                                levels=(Level(concurrency=2),)))
    assert flaky.summary["completed"] == 3 and flaky.summary["errors"] == {"http_500": 3}
    failed = [r for r in flaky.records if not r.ok]
    assert all("injected failure" in (r.error_detail or "") for r in failed)
    assert refused.model == "default"  # no /models to ask
    assert refused.summary["completed"] == 0 and refused.summary["errors"] == {"connection": 6}
    assert refused.summary["ttft_ms"]["p50"] is None


def test_empty_stream_is_an_error() -> None:
    with stub_server(StubConfig(num_tokens=0, ttft=0.0)) as (url, _):
        [result] = run_load_sync(make_cfg(Target("empty", url), num_requests=2))
    assert result.summary["errors"] == {"empty_output": 2}


def test_timeout_bounds_a_hung_server() -> None:
    with stub_server(StubConfig(hang=True)) as (url, _):
        start = time.perf_counter()
        results = run_load_sync(make_cfg(Target("hung", url), num_requests=4, timeout=1.5,
                                         levels=(Level(concurrency=2), Level(concurrency=1))))
        elapsed = time.perf_counter() - start
    # Hung requests are held to the deadline, and no later: a second level given its own
    # 1.5 s would take >= 3 s, the backstop >= 3.5 s (so the margin is for a loaded machine).
    assert 1.5 - EARLY <= elapsed < 1.5 + 1.5
    first, second = (r.summary for r in results)
    assert first["errors"] == {"not_started": 2, "timeout": 2}
    assert second["errors"] == {"not_started": 4}
    assert all(r.ttft is None and r.error == "timeout" for r in results[0].records)


def test_request_timeout_cuts_single_requests() -> None:
    # The first token is sent at once, the second 2 s later: a 0.5 s request timeout cuts
    # every request between the two, leaving 0.5 s and 1.5 s for a loaded machine's delays.
    with stub_server(StubConfig(ttft=0.0, itl=2.0, num_tokens=10)) as (url, _):
        [result] = run_load_sync(make_cfg(Target("slow", url), num_requests=2,
                                          request_timeout=0.5, timeout=30))
    assert result.summary["errors"] == {"timeout": 2}
    for r in result.records:
        # Partial streams keep what was seen: the first token arrived before the cut.
        assert r.ttft is not None and r.num_chunks == 1, r
        assert 0.5 - EARLY <= r.e2e < 2.0, r
