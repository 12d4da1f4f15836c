"""bench.search_vs_bon: the equal-compute rule, the pair and outcome counts, and the quick size
end to end (real server, real trainer, real block search and best-of-N), checked for invariants."""
from __future__ import annotations

import json

import pytest

from adapters.train.constraints import check_all
from adapters.train.reward import score_head_entries
from bench.search_vs_bon import SIZES, arms, candidate_pairs, main, paired


def test_arms_spend_equal_compute():
    for size in SIZES.values():
        bodies = arms(size, "rm")
        s = bodies["block_search"]["search"]
        best_of = next(b for name, b in bodies.items() if name.startswith("best_of_"))
        assert s["beam_width"] * s["block_tokens"] * s["max_blocks"] == best_of["best_of"] * best_of["max_tokens"]
        assert len({b["max_tokens"] for b in bodies.values()}) == 1
    with pytest.raises(ValueError, match="equal compute"):
        arms({**SIZES["full"], "beam_width": 2}, "rm")


def test_candidate_pairs_and_paired_outcomes():
    def row(*cands):
        return {"alignment": {"best_of_n": {"candidates": [{"score": s, "reward": r} for s, r in cands]}}}
    # Pairs of different scores only (C-D are both 0.0): A-B and A-C right; A-D, B-C, B-D wrong; a reward tie is wrong.
    got = candidate_pairs([row((1.0, 2.0), (0.5, -1.0), (0.0, 0.0), (0.0, 5.0)), row((1.0, 0.3), (0.0, 0.3))])
    assert (got["k"], got["n"]) == (2, 6)
    bon = [{"passed": p} for p in (True, True, False, False)]
    search = [{"passed": p} for p in (True, False, True, False)]
    assert paired(bon, search) == {"both": 1, "only_best_of_n": 1, "only_block_search": 1, "neither": 1}


# make test-slow: a whole quality run (server, model, scoring) takes minutes on 2 cores; the
# scoring it relies on is tested above in make test.
@pytest.mark.slow
def test_quick_run_end_to_end(model_dir, tmp_path):
    out = tmp_path / "svb.json"
    main(["--quick", "--dtype", "float32", "--output", str(out), "--adapter-root", str(tmp_path / "adapters")])
    doc = json.loads(out.read_text())
    cfg = doc["config"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert not set(doc["eval_templates"]) & set(doc["train_templates"])
    assert score_head_entries(tmp_path / "adapters" / "search_rm")
    assert doc["reward_model"]["pairs"] == doc["reward_model"]["preferences"]["pairs"] >= 2
    budget, max_tokens = doc["compute"]["tokens_per_request_budget"], doc["compute"]["max_tokens"]
    for name, arm in doc["arms"].items():
        assert len(arm["rows"]) == cfg["n_eval"]
        for row in arm["rows"]:
            assert row["passed"] == all(check_all(row["constraints"], row["text"]))
            assert row["completion_tokens"] <= (max_tokens if name in ("greedy", "sample") else budget)
    bon = doc["arms"][f"best_of_{cfg['best_of']}"]
    for row in bon["rows"]:
        report = row["alignment"]["best_of_n"]
        assert len(report["candidates"]) == cfg["best_of"]
        assert row["reward"] == max(c["reward"] for c in report["candidates"])
        assert row["completion_tokens"] == sum(c["num_tokens"] for c in report["candidates"])
    for row in doc["arms"]["block_search"]["rows"]:
        blocks = row["alignment"]["search"]["blocks"]
        assert 1 <= len(blocks) <= cfg["max_blocks"] and all(len(b["candidates"]) == cfg["beam_width"] for b in blocks)
        assert "".join(b["candidates"][b["chosen"]]["text"] for b in blocks) == row["text"]
        assert row["completion_tokens"] == sum(c["num_tokens"] for b in blocks for c in b["candidates"])
    # a chosen candidate that passes is a candidate that passes: the oracle bounds best-of-N
    assert doc["oracle_best_of_n_pass"]["k"] >= bon["summary"]["pass"]["k"]
    assert sum(doc["paired_best_of_n_vs_block_search"].values()) == cfg["n_eval"]
