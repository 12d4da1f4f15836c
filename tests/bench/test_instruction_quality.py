"""bench.instruction_quality: the derived best-of-N and oracle picks, the held-out pairs, and the
quick size end to end (real server, real trainer CLI for SFT / DPO / RM / ARM, every arm over
HTTP), checked for invariants and, for drift, against a float64 transformers reference."""
from __future__ import annotations

import json

import pytest

from adapters.train.constraints import check_all
from adapters.train.reward import score_head_entries
from bench.instruction_quality import main
from bench.instruction_scoring import best_of_first, candidate_pairs, chat_prefix, paired_difference, pairwise_accuracy


def bon_row(*cands):
    """One best-of-N row from (reward, passed, score) triples."""
    return {"prompt": "p", "alignment": {"best_of_n": {"candidates": [
        {"text": f"c{i}", "reward": r, "passed": ok, "score": s, "num_tokens": 3} for i, (r, ok, s) in enumerate(cands)]}}}


def test_best_of_first_picks_like_the_server_and_the_oracle():
    row = bon_row((0.5, False, 0.5), (2.0, False, 0.0), (2.0, True, 1.0), (9.0, False, 0.5))
    assert [r["candidate"] for r in best_of_first([row], 1, oracle=False)] == [0]
    assert best_of_first([row], 3, oracle=False)[0]["candidate"] == 1  # reward tie 1 vs 2: the first
    assert best_of_first([row], 4, oracle=False)[0]["candidate"] == 3
    assert best_of_first([row], 2, oracle=True)[0]["candidate"] == 0  # nobody passes: best checker score
    got = best_of_first([row], 4, oracle=True)[0]
    assert (got["candidate"], got["passed"], got["completion_tokens"]) == (2, True, 12)
    with pytest.raises(ValueError, match="best-of-5"):
        best_of_first([row], 5, oracle=False)


def test_candidate_pairs_keep_only_different_scores_better_first():
    row = bon_row((1.0, True, 1.0), (3.0, False, 0.5), (0.0, False, 0.5), (5.0, False, 0.0))
    pairs = candidate_pairs([row], per_prompt=3)  # c3 is past the first three
    assert [(p["better"], p["worse"]) for p in pairs] == [("c0", "c1"), ("c0", "c2")]
    assert pairwise_accuracy(pairs, "rm_better", "rm_worse")["k"] == 1  # 1 > 3 wrong, 1 > 0 right


def test_pairwise_accuracy_skips_missing_scores_and_resamples_prompts():
    pairs = [{"prompt": "a", "x": 2.0, "y": 1.0}, {"prompt": "a", "x": 0.0, "y": 1.0},
             {"prompt": "b", "x": 3.0, "y": 1.0}, {"prompt": "c", "x": None, "y": 1.0}]
    got = pairwise_accuracy(pairs, "x", "y")
    assert (got["k"], got["n"], got["prompts"]) == (2, 3, 2)
    # Resampling prompts a (1 of 2 right) and b (1 of 1): 1/2, 2/3 or 1 -- never below a half.
    assert 0.5 <= got["ci95_by_prompt"][0] <= got["ci95_by_prompt"][1] <= 1.0


def test_paired_difference_counts_only_shared_prompts():
    arm = [{"prompt": p, "passed": ok} for p, ok in (("a", True), ("b", True), ("c", False))]
    ref = [{"prompt": p, "passed": ok} for p, ok in (("a", True), ("b", False), ("c", True), ("d", True))]
    got = paired_difference(arm, ref)
    assert (got["n"], got["only_arm"], got["only_reference"]) == (3, 1, 1) and got["diff"] == 0.0
    assert got["ci95"][0] < 0 < got["ci95"][1]
    same = paired_difference(arm, arm)
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0]


# make test-slow: a whole quality run (server, model, scoring) takes minutes on 2 cores; the
# scoring it relies on is tested above in make test.
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_quick_run_end_to_end(model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "iq.json"
    main(["--quick", "--dtype", "float32", "--output", str(out), "--adapter-root", str(tmp_path / "adapters")])
    doc = json.loads(out.read_text())
    cfg, arms = doc["config"], doc["arms"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert not set(doc["eval_templates"]) & set(doc["train_templates"])
    assert score_head_entries(tmp_path / "adapters" / "instruction_quality" / "rm")
    prefs = doc["preferences"]
    assert {doc["adapters"][r]["examples"] for r in ("dpo", "rm", "arm")} == {prefs["pairs"]}
    assert doc["adapters"]["sft"]["examples"] == (prefs["chosen_passing"] if prefs["sft_data"] == "passing"
                                                  else prefs["pairs"])
    expected = {"base", "sft", "dpo", "block_search", "rain", *(f"genarm_{a:g}" for a in cfg["alphas"]),
                *(f"best_of_{n}_rm" for n in cfg["best_of"]), *(f"best_of_{n}_oracle" for n in cfg["oracle"])}
    assert set(arms) == expected
    constraints = {r["prompt"]: r["constraints"] for r in arms["base"]["rows"]}
    for name, arm in arms.items():
        assert len(arm["rows"]) == (cfg["n_rain"] if name == "rain" else cfg["n_eval"])
        for row in arm["rows"]:
            assert row["passed"] == all(check_all(constraints[row["prompt"]], row["text"]))
            if row["base_logprob"] is None:  # a token spans the prompt / reply boundary
                assert row["text"][:1].isspace()
            else:
                assert row["base_logprob"] <= 0 and (row["reply_tokens"] > 0) == bool(row["text"])
    n_max = max(cfg["best_of"])
    for small, big in zip(arms[f"best_of_{cfg['oracle'][0]}_oracle"]["rows"], arms[f"best_of_{n_max}_oracle"]["rows"]):
        assert big["passed"] >= small["passed"]  # more candidates never hurt the oracle
    for rm_row, oracle_row in zip(arms[f"best_of_{n_max}_rm"]["rows"], arms[f"best_of_{n_max}_oracle"]["rows"]):
        assert oracle_row["passed"] >= rm_row["passed"]
    acc = doc["pairwise_accuracy"]
    assert acc["rm"]["n"] == acc["pairs"] >= acc["arm"]["n"]
    assert all(arm["summary"]["vs_dpo"]["n"] == len(arm["rows"]) for arm in arms.values())

    # Drift and length against transformers in float64: the reply's tokens after the rendered prompt.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    row = next(r for r in arms["base"]["rows"] if r["text"] and r["base_logprob"] is not None)
    prefix = chat_prefix(tokenizer, row["prompt"])
    ids = tokenizer(prefix + row["text"], return_tensors="pt").input_ids
    n_prefix = len(tokenizer(prefix).input_ids)
    assert row["reply_tokens"] == ids.shape[1] - n_prefix
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    ref = float(logp[n_prefix - 1:].sum())
    # float32 serving vs float64: ~1e-6 relative per logit over a 49k-way softmax, a few tokens.
    assert row["base_logprob"] == pytest.approx(ref, abs=1e-3 * row["reply_tokens"])
