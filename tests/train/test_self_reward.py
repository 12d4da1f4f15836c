"""`alignserve train loop` at its quick size against a real server, through the CLI: two
self-rewarding iterations (sample, self-judge, pair, DPO, hot-load) on the default model. Checks the loop's bookkeeping
against an independent recount from the judged responses it wrote, that each adapter was loaded
into the running server and judged the next iteration, and the judge-score readout on its own."""
from __future__ import annotations

import json

import httpx
import pytest

from typer.testing import CliRunner

from adapters.train.self_reward import judge_score, pick_judged_pair
from server.cli import app as cli
from tests.conftest import ServerProcess


def test_judge_score_is_the_expected_digit_0_to_5():
    import math

    top = [(" 4", math.log(0.3)), ("3", math.log(0.1)), ("The", math.log(0.5)), ("9", math.log(0.1))]
    assert judge_score(top) == pytest.approx((0.3 * 4 + 0.1 * 3) / 0.4, rel=1e-12)  # 9 is off the rubric
    assert judge_score([(" 5", -2.0)]) == 5.0
    assert judge_score([("Sure", -0.1), ("!", -1.0)]) is None


def test_pick_judged_pair_takes_extremes_and_skips_ties():
    assert pick_judged_pair(["a", "b", "c", "d"], [2, 5, None, 1]) == (1, 3)
    assert pick_judged_pair(["a", "b", "c"], [3, 3, 1]) == (0, 2)  # first sampled among the best
    assert pick_judged_pair(["a", "b"], [4, 4]) is None
    assert pick_judged_pair(["a", " "], [5, 1]) is None  # an empty reply is never a side of a pair


def recount(judged: list[dict]) -> dict[str, int]:
    """Judge-checker agreement written again from the rows (the reference)."""
    out = {"concordant": 0, "discordant": 0, "judge_tie": 0, "unjudged": 0}
    for row in judged:
        pairs = [(row["checker"][a], row["checker"][b], row["judged"][a], row["judged"][b])
                 for a in range(len(row["checker"])) for b in range(len(row["checker"])) if a < b]
        for ca, cb, ja, jb in pairs:
            if ca == cb:
                continue
            key = ("unjudged" if ja is None or jb is None else "judge_tie" if ja == jb
                   else "concordant" if (ca - cb) * (ja - jb) > 0 else "discordant")
            out[key] += 1
    return out


@pytest.mark.timeout(900)
def test_two_iterations_train_load_and_judge_with_each_new_adapter(tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    srv = ServerProcess("--adapter-root", str(root), "--max-num-seqs", "16")
    try:
        output = root / "loop"
        result = CliRunner().invoke(cli, [
            "train", "loop", "--url", srv.base_url + "/v1", "--output", str(output), "--iterations", "2",
            "--n-prompts", "14", "--samples", "4", "--max-tokens", "24", "--concurrency", "4", "--max-steps", "2",
            "--batch-size", "2", "--seed", "0"])
        assert result.exit_code == 0, result.output
        report = json.loads((output / "self_reward.json").read_text())
        summary = json.loads(result.stdout)
        listed = {m["id"] for m in httpx.get(srv.base_url + "/v1/models", timeout=30).json()["data"]}
    finally:
        srv.stop()
    its = report["iterations"]
    assert [(s["iteration"], s["pairs"], s["heldout_pass_rate"]) for s in summary["iterations"]] == \
        [(it["iteration"], it.get("pairs"), it["heldout"]["pass_rate"]) for it in its]
    assert [it["iteration"] for it in its] == [0, 1, 2], its[-1].get("stopped")
    assert {"self-reward-1", "self-reward-2"} <= listed, listed
    assert its[1]["judged_by"] == its[0]["heldout"]["model"]  # M0 judges iteration 1 ...
    assert its[2]["judged_by"] == "self-reward-1"  # ... and the hot-loaded M1 judges iteration 2
    heldout_n = report["heldout_prompts"]
    assert heldout_n > 0
    for it in its[1:]:
        judged = [json.loads(line) for line in (output / f"judged_{it['iteration']}.jsonl").read_text().splitlines()]
        pairs = [json.loads(line) for line in (output / f"pairs_{it['iteration']}.jsonl").read_text().splitlines()]
        assert len(judged) == it["train_prompts"] and it["responses"] == 4 * len(judged)
        counts = recount(judged)
        assert {k: it["judge_vs_checker"][k] for k in counts} == counts
        assert it["unjudged"] == sum(s is None for row in judged for s in row["judged"])
        assert len(pairs) == it["pairs"] > 0
        for pair in pairs:
            row = next(r for r in judged if r["prompt"] == pair["prompt"])
            scored = [s for s in row["judged"] if s is not None]
            assert pair["chosen_judge"] == max(scored) > pair["rejected_judge"] == min(scored)
        assert it["pairs_checker_agree"] + it["pairs_checker_disagree"] <= len(pairs)
        assert it["dpo_steps"] == 2
        h = it["heldout"]
        assert h["n"] == heldout_n and h["wilson95"][0] <= h["pass_rate"] <= h["wilson95"][1]
    assert (output / "self_reward.png").stat().st_size > 0


def test_unreachable_server_is_one_message_and_status_2(tmp_path):
    result = CliRunner().invoke(cli, ["train", "loop", "--url", "http://127.0.0.1:9/v1", "--output", str(tmp_path),
                                      "--n-prompts", "10", "--iterations", "1"])
    assert result.exit_code == 2 and "cannot reach http://127.0.0.1:9/v1" in result.output, result.output
