"""Pooling the multi-LoRA benchmark's interleaved rounds: tokens over summed time, ratios to base."""
import pytest

from bench.lora_throughput import pool_levels


def _round(k: int, r: int, tokens: int, wall: float) -> dict:
    return {"distinct_adapters": k, "round": r, "output_tokens": tokens, "wall_s": wall,
            "output_tokens_per_s": tokens / wall, "errors": 0}


def test_levels_pool_tokens_over_summed_time_and_ratios_use_the_same_rounds_base():
    rounds = [_round(0, 0, 100, 1.0), _round(16, 0, 100, 2.0), _round(16, 1, 60, 2.0), _round(0, 1, 60, 0.5)]
    base, adapters = pool_levels(rounds, [0, 16])
    assert base["output_tokens_per_s"] == pytest.approx(160 / 1.5)
    assert adapters["output_tokens_per_s"] == pytest.approx(160 / 4.0)
    assert adapters["relative_to_base"] == pytest.approx((160 / 4.0) / (160 / 1.5))
    # Round 0: 50 vs 100 tok/s; round 1: 30 vs 120. Not the pooled base, each round's own.
    assert adapters["rounds_relative_to_base"] == pytest.approx([0.5, 0.25])
    assert base["rounds_relative_to_base"] == [1.0, 1.0]


def test_without_a_base_level_there_are_no_ratios_and_a_missing_level_is_an_error():
    (level,) = pool_levels([_round(4, 0, 10, 1.0)], [4])
    assert "relative_to_base" not in level and level["output_tokens"] == 10
    with pytest.raises(ValueError, match="no rounds for 16"):
        pool_levels([_round(4, 0, 10, 1.0)], [4, 16])
