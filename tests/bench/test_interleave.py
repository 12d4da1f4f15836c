"""The interleaved peers run: its schedule cancels a steady drift, its seeds never repeat, and
pooled rounds equal their requests counted together."""
from __future__ import annotations

import statistics
from collections import Counter

import pytest

from bench.config import Level, Target
from bench.interleave import MAX_ROUNDS, Slot, pool_rounds, round_seed, schedule
from bench.load import LevelResult
from bench.metrics import RequestRecord, summarize
from bench.peer_runs import PeersConfig, level_seed


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
@pytest.mark.parametrize("rounds", [1, 2, 3, 4])
def test_each_server_runs_each_level_round_once_in_alternating_order(names: tuple[str, ...], rounds: int) -> None:
    slots = schedule(names, 4, rounds)
    assert Counter(slots) == Counter(Slot(lv, r, n) for lv in range(4) for r in range(rounds) for n in names)
    # Levels run in order, and a level's rounds in order, each a pass over every server.
    keys = [(s.level, s.round) for s in slots]
    assert keys == sorted(keys)
    for level in range(4):
        passes = [[s.name for s in slots if (s.level, s.round) == (level, r)] for r in range(rounds)]
        for a, b in zip(passes, passes[1:]):
            assert b == a[::-1]
    # No server opens every level.
    openers = {next(s.name for s in slots if s.level == lv) for lv in range(4)}
    assert len(openers) == 2


@pytest.mark.parametrize("rounds", [2, 4])
def test_a_linear_drift_costs_every_server_the_same_with_even_rounds(rounds: int) -> None:
    # Slot i runs at time i; a drift slows the run in proportion to its time. With an even
    # number of mirrored passes, every server's summed time is the same in every level.
    names = ("a", "b", "c")
    slots = schedule(names, 3, rounds)
    for level in range(3):
        when = {n: sum(i for i, s in enumerate(slots) if s.level == level and s.name == n) for n in names}
        assert len(set(when.values())) == 1, when


def test_schedule_refuses_bad_arguments() -> None:
    for bad in (0, MAX_ROUNDS + 1):
        with pytest.raises(ValueError, match="rounds"):
            schedule(("a", "b"), 1, bad)
    with pytest.raises(ValueError, match="distinct"):
        schedule(("a", "a"), 1, 2)
    with pytest.raises(ValueError, match="distinct"):
        schedule((), 1, 2)


def test_every_level_and_round_gets_prompts_of_its_own() -> None:
    cfg = PeersConfig(concurrency=(1, 4, 16, 64), rounds=MAX_ROUNDS)
    target = Target("x", "http://127.0.0.1:1/v1")
    seeds = [cfg.level_config(target, i, r).prompts.seed
             for i in range(len(cfg.concurrency)) for r in range(cfg.rounds)]
    warmup_seed = cfg.warmup_config(target).prompts.seed
    assert len(set(seeds)) == len(seeds) and warmup_seed not in seeds
    # Round 0 is the one-at-a-time run's own level prompts.
    assert [cfg.level_config(target, i).prompts.seed for i in range(4)] == [level_seed(i) for i in range(4)]
    with pytest.raises(ValueError):
        round_seed(0, MAX_ROUNDS)


def test_a_level_sends_enough_requests_to_keep_its_concurrency_in_flight() -> None:
    target = Target("x", "http://127.0.0.1:1/v1")
    cfg = PeersConfig(concurrency=(1, 16, 64), num_requests=32, min_waves=2)
    assert [cfg.level_config(target, i, r).num_requests for i in range(3) for r in (0, 1)] == [32, 32, 32, 32, 128, 128]
    assert PeersConfig(concurrency=(64,), num_requests=32).level_config(target, 0).num_requests == 64
    assert PeersConfig(concurrency=(64,), num_requests=32, min_waves=0).level_config(target, 0).num_requests == 32


def _record(i: int, ttft: float, e2e: float, tokens: int, error: str | None = None) -> RequestRecord:
    return RequestRecord(index=i, session=i, turn=0, start=0.0, e2e=e2e, ttft=ttft, itl=(0.01,) * 3,
                         prompt_tokens=100, output_tokens=tokens, output_tokens_source="usage",
                         num_chunks=4, error=error)


def _level(target: Target, records: list[RequestRecord], duration: float, not_started: int = 0) -> LevelResult:
    return LevelResult(target, "m", Level(concurrency=4), tuple(records), duration, not_started,
                       summarize(records, duration, not_started))


def test_pooled_rounds_count_every_request_over_the_summed_time() -> None:
    t = Target("a", "http://127.0.0.1:1/v1")
    r0 = _level(t, [_record(0, 0.1, 1.0, 64), _record(1, 0.3, 1.2, 60)], duration=2.0)
    r1 = _level(t, [_record(0, 0.2, 0.9, 64), _record(1, 0.9, 2.0, 0, error="http_500")], duration=3.0,
                not_started=1)
    pooled = pool_rounds([r0, r1])
    s = pooled.summary
    assert s["num_requests"] == 5 and s["completed"] == 3 and s["failed"] == 2
    assert s["output_throughput"] == pytest.approx((64 + 60 + 64) / 5.0, abs=1e-4)
    assert s["ttft_ms"]["p50"] == pytest.approx(statistics.median([100.0, 300.0, 200.0]))
    assert pooled.duration == 5.0 and pooled.num_not_started == 1


def test_pooling_refuses_mixed_servers_or_nothing() -> None:
    a, b = Target("a", "http://127.0.0.1:1/v1"), Target("b", "http://127.0.0.1:2/v1")
    with pytest.raises(ValueError, match="different"):
        pool_rounds([_level(a, [_record(0, 0.1, 1.0, 8)], 1.0), _level(b, [_record(0, 0.1, 1.0, 8)], 1.0)])
    with pytest.raises(ValueError, match="no rounds"):
        pool_rounds([])
