"""AsyncEngine woken from idle gathers a burst of requests into its first step (SchedulerConfig's
burst_wait_ms / burst_gap_ms), and never waits past burst_wait_ms."""
from __future__ import annotations

import asyncio

import pytest

from server.engine.async_engine import AsyncEngine
from server.engine.sequence import SamplingParams
from tests.conftest import make_engine


def first_step_requests(model_dir, wait_ms: float, gap_ms: float, spacing_s: float) -> list[set[str]]:
    """Four requests, `spacing_s` apart, into an idle engine; per step, the request ids that had
    a token after it (read on the engine thread, by on_step)."""
    engine = make_engine(model_dir, burst_wait_ms=wait_ms, burst_gap_ms=gap_ms)
    seen: list[set[str]] = []

    def on_step(e) -> None:
        seen.append({rid for rid, r in e.requests.items() if r.num_generated > 0})

    aeng = AsyncEngine(engine, on_step=on_step)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> None:
        await asyncio.sleep(spacing_s * i)
        async for _ in aeng.generate([100 + i, 200, 300, 400 + i], params, request_id=f"r{i}"):
            pass

    async def burst() -> None:
        await asyncio.gather(*(one(i) for i in range(4)))

    try:
        asyncio.run(burst())
    finally:
        aeng.shutdown()
    return [s for s in seen if s]


@pytest.mark.parametrize("wait_ms,gap_ms,spacing_s,first", [
    (5000.0, 1000.0, 0.2, {"r0", "r1", "r2", "r3"}),  # gathered: one prefill for the burst
    (0.0, 4.0, 1.0, {"r0"}),                           # off: the first request starts alone
    (100.0, 5000.0, 1.0, {"r0"}),                      # the wait is capped, however long the gap
])
# NOTE: the spacings leave the engine thread 1 s (negative cases) to wake and start its step, and
# the gathering case a 1 s gap against 0.2 s arrivals, so a slow or busy machine cannot flip them.
def test_first_step_takes_the_burst_only_within_the_wait(model_dir, wait_ms, gap_ms, spacing_s, first):
    steps = first_step_requests(model_dir, wait_ms, gap_ms, spacing_s)
    assert steps[0] == first
