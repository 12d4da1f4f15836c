"""bench/train_loop.py's pure helpers (the loop itself needs the real server and is not run here)."""
from __future__ import annotations

import pytest

from bench.train_loop import paired, parse_args, summarise, wilson


def test_wilson_interval() -> None:
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)


def test_summarise_and_paired() -> None:
    records = [{"constraints": [{"id": "case:lower", "args": {}}]},
               {"constraints": [{"id": "case:lower", "args": {}}, {"id": "punctuation:no_commas", "args": {}}]}]
    s = summarise(records, ["all lower", "lower, with comma"])
    assert (s["n"], s["passed"], s["all_passed"]) == (2, 1, [True, False])
    assert s["per_constraint"]["case:lower"] == {"passed": 2, "n": 2, "rate": 1.0}
    assert paired([True, False, False], [False, True, False]) == {"fixed": 1, "broken": 1}
    assert parse_args([]).samples == 8
