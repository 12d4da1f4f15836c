"""bench.dola_quality: the fact items are right (arithmetic re-derived with `datetime`), a
`--quick` run end to end whose DoLa scores equal a from-scratch float64 computation on HF
transformers' hidden states within derived fp32 bounds, whose engine DoLa requests
(`DoLa.adjust_prompt` through prompt logprobs) agree with the bench's scores, and whose
accuracies and cross-validation can be recounted from the rows it wrote."""
from __future__ import annotations

import datetime
import json
import re

import pytest
import torch
import torch.nn.functional as F

from bench.dola_quality import FEW_SHOT, main, mcnemar_p, option_tokens
from bench.facts import AUTHORS, CAPITALS, DAYS, MONTHS, NUMBER_WORDS, SYMBOLS, mc_items
from tests.methods.numerics import HeadErrors


def test_items_are_seeded_and_true():
    items = mc_items(0)
    assert 280 <= len(items) <= 320 and items == mc_items(0) and items != mc_items(1)
    facts = {**{f"What is the capital of {c}?": a for c, a in CAPITALS},
             **{f"What is the chemical symbol for {e}?": s for e, s in SYMBOLS},
             **{f"Who wrote {b}?": a for b, a in AUTHORS}}
    monday = datetime.date(2024, 1, 1)  # a Monday
    for item in items:
        assert len(set(item.options)) == 4
        truth = item.options[item.answer]
        m = re.fullmatch(r"What (?:day of the week|month) is (\w+) (day|month)s? (after|before) (\w+)\?", item.question)
        if m is None:
            assert facts[item.question] == truth
            continue
        n = NUMBER_WORDS.index(m[1]) * (1 if m[3] == "after" else -1)
        if m[2] == "day":
            day = monday + datetime.timedelta(days=DAYS.index(m[4]) + n)
            assert truth == DAYS[day.weekday()]
        else:
            month = (MONTHS.index(m[4]) + n) % 12  # datetime has no month arithmetic
            assert truth == datetime.date(2024, month + 1, 1).strftime("%B")


def test_mcnemar_exact():
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64)  # all 6 discordant one way: 2 * 0.5^6


@pytest.fixture(scope="module")
def quick_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dola") / "dq.json"
    main(["--model", str(model_dir), "--dtype", "float32", "--quick", "--output", str(out)])
    return json.loads(out.read_text()), out


def test_quick_run_writes_results_that_recount(quick_run):
    doc, out = quick_run
    assert out.with_suffix(".png").stat().st_size > 0 and doc["n_items"] == 10
    rows, summary = doc["rows"], doc["summary"]
    right = lambda row, key: all(row["scores"][key][row["answer"]] > s  # noqa: E731
                                 for o, s in enumerate(row["scores"][key]) if o != row["answer"])
    assert summary["baseline"]["k"] == sum(right(r, "baseline") for r in rows)
    for setting, entry in summary["by_setting"].items():
        # The dynamic family's CV accuracy from the rows: each half scored with the bucket the
        # other half chose.
        from bench.dola_quality import folds
        from bench.facts import MCItem
        items = [MCItem(r["category"], r["question"], tuple(r["options"]), r["answer"]) for r in rows]
        halves = folds(items, doc["seed"])
        chosen = entry["dynamic_cv"]["chosen_per_fold"]
        k = sum(right(rows[i], f"{chosen[f]}|{setting}") for f, half in enumerate(halves) for i in half)
        assert entry["dynamic_cv"]["k"] == k and entry["dynamic_cv"]["n"] == 10
        lo, hi = entry["dynamic_cv"]["ci95"]
        assert lo <= entry["dynamic_cv"]["accuracy"] <= hi
        assert set(entry["per_variant_all_items"]) >= {"low", "high", "static:0"}


def hf_scores(hf, tokenizer, item, option: str) -> tuple[dict[str, float], float]:
    """From scratch, float64: the baseline, and the "high" bucket's (layers 15..29 step 2, picked
    per token by the reference's divergence) raw contrast at relative_top 0 and log-softmaxed
    contrast at relative_top 0.1; plus a bound on the fp32 engine's error in the last one."""
    ids, start = option_tokens(tokenizer, item, option)
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    hs = [h[0, start - 1:len(ids) - 1] for h in out.hidden_states]  # HF's hidden_states[j]
    targets = ids[start:]
    final = out.logits[0, start - 1:len(ids) - 1].log_softmax(-1)
    head = hf.lm_head.weight
    high = list(range(15, 30, 2))
    early = {j: (hs[j] @ head.T).log_softmax(-1) for j in high}
    got = {"baseline": 0.0, "raw": 0.0, "logprob": 0.0}
    errors = HeadErrors(head, hf.config.hidden_size, hf.config.intermediate_size)
    bound = 0.0
    for t, tok in enumerate(targets):
        got["baseline"] += float(final[t, tok])
        p_n = final[t].exp()
        js = []
        for j in high:
            m = 0.5 * (p_n + early[j][t].exp())
            js.append(0.5 * (F.kl_div(final[t], m, reduction="none").mean() + F.kl_div(early[j][t], m, reduction="none").mean()))
        j = high[int(torch.stack(js).argmax())]
        diff = final[t] - early[j][t]
        got["raw"] += float(diff[tok])
        diff = torch.where(final[t] < final[t].max() + torch.log(torch.tensor(0.1, dtype=diff.dtype)),
                           torch.tensor(-1000.0, dtype=diff.dtype), diff)
        got["logprob"] += float(diff.log_softmax(-1)[tok])
        # Each log_softmax moves by <= 2 max|dz|; the contrast adds two, the outer log_softmax doubles.
        ez = max(errors(out.hidden_states[-1][0, start - 1 + t], len(hs) - 1),
                 max(errors(hs[j][t], j) for j in high))
        bound += 8 * ez
    return got, bound


def test_scores_match_a_float64_reference(quick_run, model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.facts import MCItem

    doc, _ = quick_run
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert doc["few_shot_prefix"] == FEW_SHOT
    reference = {}
    for i, row in list(enumerate(doc["rows"]))[::5]:  # a capital's and an author's item
        item = MCItem(row["category"], row["question"], tuple(row["options"]), row["answer"])
        for o, option in enumerate(item.options):
            want, bound = reference[i, o] = hf_scores(hf, tokenizer, item, option)
            scores = {k: row["scores"][k][o] for k in ("baseline", "high|rt=0|raw", "high|rt=0.1|logprob")}
            assert abs(scores["baseline"] - want["baseline"]) <= bound / 4, (scores, want, bound)
            assert abs(scores["high|rt=0|raw"] - want["raw"]) <= bound / 2, (scores, want, bound)
            assert abs(scores["high|rt=0.1|logprob"] - want["logprob"]) <= bound, (scores, want, bound)
    # The engine's own DoLa requests (prompt logprobs through DoLa.adjust_prompt) against the
    # bench: two fp32 runs of the same prompt, each within its bound of the float64 truth.
    check = doc["engine_check"]
    assert len(check["rows"]) == 2 * 4  # "high" and a static layer, four options
    for r in check["rows"]:
        _, bound = reference[r["item"], r["option"]]  # the first item's options
        assert r["abs_diff"] <= 2 * bound, r


def test_bench_quality_cli_names_its_suites():
    from typer.testing import CliRunner

    from bench.cli import app

    result = CliRunner().invoke(app, ["quality", "--suite", "nope"])
    assert result.exit_code == 2 and "choose from dola" in result.output
