"""bench.rain_quality: the refusal detector on labelled replies, the train / evaluation split, and
the quick size end to end (real server, real trainer, real RAIN), checked for its invariants."""
from __future__ import annotations

import json

import pytest

from adapters.train.constraints import check_all
from adapters.train.reward import score_head_entries
from bench.rain_quality import (
    BENIGN,
    HARMFUL,
    REFUSALS,
    TRAIN_BENIGN,
    TRAIN_HARMFUL,
    TRAIN_REFUSALS,
    harmful_requests,
    instruction_split,
    main,
    preference_pairs,
    refused,
)

FILL = {"who": "neighbour", "thing": "tea"}


def test_refusal_detector_on_labelled_replies():
    for refusal in REFUSALS + TRAIN_REFUSALS:
        assert refused(refusal.format(**FILL)), refusal
    for _, reply in HARMFUL + TRAIN_HARMFUL + BENIGN + TRAIN_BENIGN:  # compliant or helpful: not refusals
        assert not refused(reply.format(**FILL)), reply
    assert refused("I'm sorry, but that is not something I can do.")
    assert not refused("To open the jar, run it under hot water; I can say it works.")


def test_training_and_evaluation_templates_are_disjoint():
    assert not {r for r, _ in TRAIN_HARMFUL} & {r for r, _ in HARMFUL}
    assert not set(TRAIN_REFUSALS) & set(REFUSALS)
    assert not {r for r, _ in TRAIN_BENIGN} & {r for r, _ in BENIGN}
    train, heldout = instruction_split(20, 10, seed=0)
    assert not {r["template"] for r in train} & {r["template"] for r in heldout}
    assert {r["split"] for r in heldout} == {"heldout"}
    requests = harmful_requests(HARMFUL, 30, seed=0)
    assert len({r["request"] for r in requests}) == 30 and all("{" not in r["request"] for r in requests)


def test_preference_pairs_prefer_refusing_harm_and_helping_otherwise():
    harmful = harmful_requests(TRAIN_HARMFUL, 3, seed=1)
    benign = harmful_requests(TRAIN_BENIGN, 2, seed=2)
    instr, _ = instruction_split(2, 1, seed=0)
    replies = {instr[0]["prompt"]: "Here is a short poem.", instr[1]["prompt"]: "I can't help with that."}
    pairs = preference_pairs(harmful, TRAIN_REFUSALS, benign, instr, replies, seed=0)
    assert [p["kind"] for p in pairs] == ["harmful"] * 3 + ["benign"] * 2 + ["instruction"]  # a refusal is skipped
    assert all(refused(p["chosen"]) and not refused(p["rejected"]) for p in pairs[:3])
    assert all(refused(p["rejected"]) and not refused(p["chosen"]) for p in pairs[3:])


# make test-slow: a whole quality run (server, model, scoring) takes minutes on 2 cores; the
# scoring it relies on is tested above in make test.
@pytest.mark.slow
def test_quick_run_end_to_end(model_dir, tmp_path):
    out = tmp_path / "rq.json"
    main(["--quick", "--dtype", "float32", "--output", str(out), "--adapter-root", str(tmp_path / "adapters")])
    doc = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert set(doc["arms"]) == {"plain_greedy", "plain_t1", "rain_self", "rain_rm"}
    assert doc["eval_prompts_in_training"] == []
    rm = doc["reward_model"]
    assert score_head_entries(tmp_path / "adapters" / "rain_rm") and rm["steps"] == 1
    assert "train rm" in rm["command"] and rm["pairs"] == sum(rm["train_kinds"].values())
    acc = rm["heldout_pairwise_accuracy"]
    assert acc["all"]["n"] == len(acc["rows"]) == sum(acc[k]["n"] for k in ("harmful", "benign", "instruction"))
    max_tokens = doc["config"]["max_tokens"]
    for name, arm in doc["arms"].items():
        assert len(arm["harmful"]) == doc["config"]["n_harmful"] and len(arm["benign"]) == doc["config"]["n_benign"]
        for row in arm["harmful"] + arm["benign"]:
            assert row["refused"] == refused(row["text"])
            if name.startswith("plain"):
                assert row["alignment"] is None and 1 <= row["completion_tokens"] <= max_tokens
            else:  # usage counts every token the search sampled, at least the reply's
                report = row["alignment"]["rain"]
                assert report["evaluator"] == {"rain_self": "self", "rain_rm": "rain-rm"}[name]
                assert row["completion_tokens"] == report["num_generated_tokens"] >= len(report["steps"])
                assert "".join(s["text"] for s in report["steps"]) == row["text"]
        for row in arm["benign"]:
            assert row["passed"] == all(check_all(row["constraints"], row["text"]))
        s = arm["summary"]
        for key in ("harmful_refusal", "benign_pass", "benign_refusal"):
            assert s[key]["ci95"][0] <= s[key]["rate"] <= s[key]["ci95"][1]
    assert doc["arms"]["plain_greedy"]["summary"]["latency_vs_plain_greedy"] == 1.0
