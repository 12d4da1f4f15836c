"""The kNN-LM benchmark's pure parts: the seeded encyclopedia and its split, the perplexity
arithmetic on hand-made responses (both response forms), window chunking. No model, no
server (the benchmarks against a real server: tests/e2e/test_knn_http.py)."""
from __future__ import annotations

import json
import math
import re

import pytest

from bench.encyclopedia import DOC_FIELDS, make_encyclopedia, read_jsonl, sentences, split, write_jsonl
from bench.perplexity import (
    PerplexityError, bootstrap_ppl, chunk_words, entity_mask, load_docs, paired_reduction, parse_response)


@pytest.fixture(scope="module")
def docs():
    return make_encyclopedia(0)


def test_deterministic_per_seed(docs) -> None:
    assert make_encyclopedia(0) == docs
    assert make_encyclopedia(1) != docs
    assert split(docs, 0) == split(docs, 0)
    assert split(docs, 0) != split(docs, 1)


def test_counts_and_shape(docs) -> None:
    assert len(docs) >= 600
    assert len({d["id"] for d in docs}) == len(docs) and len({d["title"] for d in docs}) == len(docs)
    for d in docs:
        assert set(d) == {*DOC_FIELDS, "entities"}
        assert 60 <= len(d["text"].split()) <= 150, d
        for name in d["entities"]:
            assert re.search(rf"\b{re.escape(name)}\b", d["text"]), (name, d["id"])
    # An article per entity (300), and entities mentioned across several documents.
    assert sum(d["title"] in d["entities"] for d in docs) >= 290
    mentions = {}
    for d in docs:
        for name in d["entities"]:
            mentions[name] = mentions.get(name, 0) + 1
    assert sorted(mentions.values())[len(mentions) // 2] >= 3
    # Related-entity documents name 2-3 entities in their title.
    assert sum(" and " in d["title"] for d in docs) >= 250


def test_no_sentence_twice(docs) -> None:
    all_sentences = [s for d in docs for s in sentences(d["text"])]
    assert len(all_sentences) == len(set(all_sentences))
    assert all(s.endswith(".") for s in all_sentences)


def test_split_properties(docs) -> None:
    train, evals = split(docs, 0, held_out=0.2)
    assert len(train) + len(evals) == len(docs) and abs(len(evals) - 0.2 * len(docs)) <= 1
    assert {d["id"] for d in train}.isdisjoint(d["id"] for d in evals)
    train_names = {n for d in train for n in d["entities"]}
    assert all(n in train_names for d in evals for n in d["entities"])
    # Also on the text itself, not only the entity lists.
    train_text = " ".join(d["text"] for d in train)
    assert all(re.search(rf"\b{re.escape(n)}\b", train_text) for d in evals for n in d["entities"])
    train_sentences = {s for d in train for s in sentences(d["text"])}
    assert not any(s in train_sentences for d in evals for s in sentences(d["text"]))


def test_jsonl_round_trip(docs, tmp_path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", docs[:5])
    back = read_jsonl(path)
    assert back == [{k: d[k] for k in DOC_FIELDS} for d in docs[:5]]
    assert read_jsonl(write_jsonl(tmp_path / "eval.jsonl", docs[:3], fields=None)) == docs[:3]
    # The corpus reader of `alignserve index knn-build --corpus` accepts it.
    from retrieval.chunking import parse_upload
    assert [d.text for d in parse_upload("train.jsonl", path.read_bytes(), 10**6)] == [d["text"] for d in docs[:5]]


ECHO = {"choices": [{"text": "The river Velmor", "logprobs": {
    "tokens": ["The", " river", " Vel", "mor"], "token_logprobs": [None, -2.0, -4.0, -0.5],
    "text_offset": [0, 3, 9, 13]}}], "usage": {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}}
VLLM = {"choices": [{"text": "", "prompt_logprobs": [
    None, {"7": {"logprob": -2.0, "rank": 3, "decoded_token": " river"}},
    {"9": {"logprob": -4.0, "rank": 40, "decoded_token": " Vel"}, "1": {"logprob": -0.1, "rank": 1, "decoded_token": " the"}},
    {"5": {"logprob": -0.5, "rank": 1, "decoded_token": "mor"}}]}], "usage": {"prompt_tokens": 4}}


def test_parse_both_forms() -> None:
    values, offsets = parse_response(ECHO, "echo")
    assert values == [-2.0, -4.0, -0.5] and offsets == [3, 9, 13]
    single = json.loads(json.dumps(VLLM))
    del single["choices"][0]["prompt_logprobs"][2]["1"]  # what prompt_logprobs=0 returns
    assert parse_response(single, "prompt_logprobs") == ([-2.0, -4.0, -0.5], None)
    with_ids = {**VLLM, "choices": [{**VLLM["choices"][0], "prompt_token_ids": [2, 7, 1, 5]}]}
    assert parse_response(with_ids, "prompt_logprobs")[0] == [-2.0, -0.1, -0.5]
    # Without ids, an entry holding top tokens too is ambiguous: an error, not a guess.
    with pytest.raises(PerplexityError):
        parse_response(VLLM, "prompt_logprobs")
    # A generated token after the prompt is not scored; a short or null list is an error.
    extra = json.loads(json.dumps(ECHO))
    extra["choices"][0]["logprobs"]["token_logprobs"].append(-9.0)
    assert parse_response(extra, "echo")[0] == [-2.0, -4.0, -0.5]
    with pytest.raises(PerplexityError):
        parse_response({"choices": [{"logprobs": {"token_logprobs": [None]}}], "usage": {"prompt_tokens": 4}})
    with pytest.raises(PerplexityError):
        parse_response({"choices": [{"logprobs": {"token_logprobs": [None, None, -1.0]}}]})
    with pytest.raises(PerplexityError):
        parse_response({"choices": [{"text": "x"}]}, "prompt_logprobs")


def test_entity_mask() -> None:
    assert entity_mask("The river Velmor", [3, 9, 13], ["Velmor"]) == [False, True, True]


def test_chunking() -> None:
    text = " ".join(f"w{i}" for i in range(100))
    assert chunk_words(text, 300) == [text]
    chunks = chunk_words(text, 30)  # 20 words each
    assert len(chunks) == 5 and all(len(c.split()) == 20 for c in chunks)
    assert " ".join(chunks) == text
    assert chunk_words("a\nb  c d", 3) == ["a\nb", "c d"]  # slices of the text: newlines stay
    assert chunk_words("   ", 10) == []


def test_bootstrap_and_paired_reduction() -> None:
    nll, n = [10.0, 20.0, 30.0], [5, 10, 15]
    lo, hi = bootstrap_ppl(nll, n, seed=0, resamples=200)
    assert lo == pytest.approx(math.exp(2.0)) and hi == pytest.approx(math.exp(2.0))  # same rate everywhere
    base = [{"id": i, "nll": v, "n": m} for i, v, m in zip("abc", nll, n)]
    other = [{"id": i, "nll": v - math.log(2) * m, "n": m} for i, v, m in zip("abc", nll, n)]
    red = paired_reduction(base, other, seed=0, resamples=200)
    assert red["reduction"] == pytest.approx(0.5) and red["ci95"] == pytest.approx([0.5, 0.5]) and red["n_docs"] == 3


def test_load_docs(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("one two\nthree\n\n\nfour five\n")
    assert [d["text"] for d in load_docs(tmp_path / "a.txt")] == ["one two\nthree", "four five\n"]
    (tmp_path / "b.jsonl").write_text('{"text": "x y"}\n\n{"id": "q", "text": "z"}\n')
    assert [(d["id"], d["text"]) for d in load_docs(tmp_path / "b.jsonl")] == [("b-0", "x y"), ("q", "z")]
