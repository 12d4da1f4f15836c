"""The RAG benchmark's pure parts: the seeded fact set, the answer normaliser, the metrics.
(The benchmark against a real server: tests/e2e/test_rag_http.py.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.rag_facts import (assert_disjoint, make_disjoint_set, make_fact_set, name_words, read_jsonl)
from bench.rag_quality import answer_match, exact_match, normalize_answer, parse_args, rate
from bench.train_loop import wilson


@pytest.fixture(scope="module")
def facts():
    return make_fact_set(0, 300)


def test_deterministic_per_seed(facts) -> None:
    again = make_fact_set(0, 300)
    assert again.documents == facts.documents and again.questions == facts.questions
    assert make_fact_set(1, 300).documents != facts.documents
    assert make_fact_set(0, 30).documents[0]["id"] == "fact-s0-0000"


def test_counts_and_shape(facts) -> None:
    qs, docs = facts.questions, facts.documents
    assert len(qs) >= 300 and len({q["doc_id"] for q in qs}) >= 300
    assert len({d["id"] for d in docs}) == len(docs) == 300
    assert len({d["title"] for d in docs}) == len(docs)  # entity names are unique
    assert abs(sum(q["paraphrased"] for q in qs) - len(qs) / 3) <= 1
    # Any prefix (the bench's --num-questions) keeps a third paraphrased.
    assert abs(sum(q["paraphrased"] for q in qs[:100]) - 100 / 3) <= 1
    for q in qs:
        assert set(q) == {"id", "question", "answer", "doc_id", "attribute", "paraphrased"}
    for d in docs:
        assert set(d) == {"id", "title", "text"} and "#" not in d["id"]
        words = len(d["text"].split())
        sentences = len(re.findall(r"[.!?](\s|$)", d["text"]))
        assert 40 <= words <= 80 and 2 <= sentences <= 4, d
    assert len({q["attribute"] for q in qs}) == 15


def test_answers_appear_in_gold_passage(facts) -> None:
    text = {d["id"]: d["text"] for d in facts.documents}
    title = {d["id"]: d["title"] for d in facts.documents}
    for q in facts.questions:
        assert q["answer"] in text[q["doc_id"]], q
        assert title[q["doc_id"]] in q["question"], q  # the question names its entity


def test_paraphrases_avoid_the_passage_wording(facts) -> None:
    # Key verbs/nouns of the passages that literal questions reuse and paraphrases must not.
    keys = {"born", "work", "works", "pet", "profession", "founded", "headquarters", "making", "chief",
            "banks", "mayor", "inhabitants", "region", "dish", "town"}
    for q in facts.questions:
        words = set(re.findall(r"[a-z]+", q["question"].lower()))
        if q["paraphrased"]:
            assert not words & keys, q
    literal = [q for q in facts.questions if not q["paraphrased"]]
    assert all(set(re.findall(r"[a-z]+", q["question"].lower())) & keys for q in literal)


def test_disjoint_training_set(facts) -> None:
    train = make_disjoint_set(1, 600)
    assert_disjoint(facts, train)
    assert_disjoint(make_fact_set(7, 300), make_disjoint_set(7, 300))  # same seed, still disjoint
    assert not {e["name"] for e in facts.entities} & {e["name"] for e in train.entities}
    assert not name_words(facts) & name_words(train)
    answers = {q["answer"].lower() for q in facts.questions}
    assert not answers & {q["answer"].lower() for q in train.questions}
    assert make_disjoint_set(1, 600).questions == train.questions
    with pytest.raises(AssertionError):
        assert_disjoint(facts, facts)


def test_wilson_against_hand_computed() -> None:
    # Decimal arithmetic to 40 digits of the Wilson formula with z = 1.959964.
    lo, hi = wilson(7, 20)
    assert lo == pytest.approx(0.18119182312398307, rel=1e-12)
    assert hi == pytest.approx(0.56714572493155583, rel=1e-12)
    lo, hi = wilson(299, 300)
    assert lo == pytest.approx(0.98136330610334947, rel=1e-12)
    assert hi == pytest.approx(0.99941134228465038, rel=1e-12)
    assert rate(0, 0) == {"k": 0, "n": 0, "rate": None, "wilson95": [0.0, 1.0]}


def test_normaliser_and_matching() -> None:
    assert normalize_answer("  The Velm   River! ") == "velm river"
    assert normalize_answer("48,200") == normalize_answer("48200") == "48200"
    assert normalize_answer("An “apple”, a pear.") == "apple pear"
    assert answer_match("It was founded in 1923 [1].", "1923")
    assert not answer_match("It was founded in 19234.", "1923")
    assert not answer_match("Pimbra", "Pim") and answer_match("Pim.", "Pim")
    assert answer_match("about 48,200 people", "48,200") and answer_match("48200", "48,200")
    assert answer_match("The copper kettles.", "copper kettles")
    assert not answer_match("anything", "") and not answer_match("", "Velm")
    assert exact_match("The Velm.", "velm") and not exact_match("Velm River", "Velm")


def test_dump_questions(tmp_path: Path) -> None:
    from bench.rag_quality import dump_questions

    args = parse_args(["--dump-questions", str(tmp_path), "--num-entities", "30", "--train-size", "30"])
    out = dump_questions(args)
    docs, qs = read_jsonl(Path(out["eval"]["documents"])), read_jsonl(Path(out["eval"]["questions"]))
    assert len(docs) == len(qs) == 30 and docs[0].keys() == {"id", "title", "text"}
    assert len(read_jsonl(Path(out["train"]["questions"]))) == 30
