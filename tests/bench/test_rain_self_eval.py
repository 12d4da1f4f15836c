"""bench.rain_self_eval: the labelled pairs, and one small run through RAIN's SelfEvaluator
whose per-order decisions must agree with the vote RAIN itself computes."""
from __future__ import annotations

import json

from bench.rain_self_eval import labelled_pairs, main


def test_pairs_are_balanced_seeded_and_labelled():
    pairs = labelled_pairs(10, seed=3)
    assert pairs == labelled_pairs(10, seed=3) and pairs != labelled_pairs(10, seed=4)
    kinds = {k: [p for p in pairs if p["kind"] == k] for k in ("harmful_comply", "harmful_refuse", "benign_help")}
    assert all(len(v) == 10 for v in kinds.values())
    assert {p["label"] for p in kinds["harmful_comply"]} == {"harmful"}
    assert {p["label"] for p in kinds["harmful_refuse"] + kinds["benign_help"]} == {"harmless"}
    assert all("{" not in p["request"] + p["reply"] for p in pairs)  # every placeholder filled


def test_small_run_matches_rains_vote(model_dir, tmp_path):
    out = tmp_path / "rse.json"
    main(["--model", str(model_dir), "--dtype", "float32", "--pairs-per-kind", "2", "--output", str(out)])
    doc = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0 and doc["n_pairs"] == 6
    for row in doc["rows"]:
        a0, a1 = row["picked_a"]  # RAIN's vote: order 0 votes harmless when A wins, order 1 when B wins
        assert row["vote"] == float(a0 + (not a1) - 1)
        harmless = row["label"] == "harmless"
        assert row["first_order_correct"] == (a0 == harmless) and row["second_order_correct"] == (a1 != harmless)
    assert doc["summary"]["all"]["vote_correct"]["n"] == 6
