"""Every constraint checker, with at least one passing and one failing response."""
from __future__ import annotations

import random

import pytest

from adapters.train.constraints import (CONSTRAINTS, END_PHRASES, EXCLUDE_LETTERS, EXCLUDE_WORDS,
                                        INCLUDE_WORDS, POSTSCRIPT_MARKERS, check, compatible, count_sentences,
                                        count_words, describe, score, split_paragraphs)

# (constraint id, args, passing response, failing response)
CASES = [
    ("length:max_words", {"n": 5}, "One two three four five.", "One two three four five six."),
    ("length:max_words", {"n": 5}, "It's a dog's life.", ""),
    ("length:min_words", {"n": 4}, "one two three four", "one two three"),
    ("length:max_sentences", {"n": 2}, "First one. Second one!", "One. Two? Three."),
    ("length:max_sentences", {"n": 2}, "No final stop at all", "..."),
    ("length:paragraphs", {"n": 2}, "First para.\n\nSecond para.", "Only one\nparagraph here."),
    ("length:paragraphs", {"n": 2}, "A\n   \nB\n", "A\n\nB\n\nC"),
    ("keywords:include", {"keywords": ["ocean", "river"]}, "The River meets the ocean.",
     "The oceans and rivers."),
    ("keywords:exclude", {"keywords": ["very", "nice"]}, "A pleasant day.", "A Very good day."),
    ("keywords:exclude", {"keywords": ["very", "nice"]}, "Everyone is here.", "   "),
    ("keywords:frequency", {"keyword": "music", "n": 2}, "Music, music everywhere.", "Music and musical."),
    ("letters:exclude", {"letter": "z"}, "A calm day.", "A Zebra."),
    ("case:lower", {}, "all lowercase, even 42.", "Not lowercase."),
    ("case:lower", {}, "all good", "123"),
    ("case:upper", {}, "ALL CAPS HERE!", "ALL CAPS but one."),
    ("ending:phrase", {"phrase": "That is all."}, "Some text. That is all.  \n", "That is all. More text."),
    ("format:bullets", {"n": 3}, "Intro\n* one\n* two\n- three", "* one\n* two"),
    ("format:bullets", {"n": 2}, "* one\n* two\n**bold** line", "* one\n* two\n* three"),
    ("format:json", {}, '{"a": [1, 2]}', "{'a': 1}"),
    ("format:json", {}, '```json\n{"a": 1}\n```', "The answer is {\"a\": 1}"),
    ("punctuation:no_commas", {}, "No commas here.", "One, two."),
    ("format:title", {}, "<<A Title>>\nBody text.", "<A Title>\nBody text."),
    ("startend:quotation", {}, '  "Quoted answer."\n', 'Unquoted "answer".'),
    ("content:postscript", {"marker": "P.S."}, "Body.\n\nP.S. see you", "Body. No postscript."),
    ("content:postscript", {"marker": "P.P.S."}, "Body.\np.p.s. lower works", "Body.\nP.S. wrong marker"),
    ("format:highlights", {"n": 2}, "*one* and *two*", "*one* only"),
    ("content:placeholders", {"n": 2}, "Send to [name] at [address].", "Send to [name]."),
]


@pytest.mark.parametrize(("cid", "args", "good", "bad"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_pass_and_fail(cid: str, args: dict, good: str, bad: str) -> None:
    assert check(cid, args, good), f"{cid} should accept {good!r}"
    assert not check(cid, args, bad), f"{cid} should reject {bad!r}"


def test_every_constraint_has_cases() -> None:
    assert {c[0] for c in CASES} == set(CONSTRAINTS)


def test_helpers() -> None:
    assert count_words("It's 3 o'clock, isn't it?") == 5
    assert count_sentences("One. Two! Three?") == 3
    assert split_paragraphs("a\n\nb\n\n\nc") == ["a", "b", "c"]


def test_score_is_fraction_met() -> None:
    constraints = [{"id": "case:lower", "args": {}}, {"id": "punctuation:no_commas", "args": {}}]
    assert score(constraints, "all lower, with comma") == 0.5
    assert score(constraints, "all lower") == 1.0
    assert score([], "anything") == 1.0


def test_unknown_constraint_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown constraint id"):
        check("nope", {}, "x")


def test_conflicts_are_symmetric_in_compatible() -> None:
    assert not compatible(["case:lower", "case:upper"])
    assert not compatible(["case:upper", "case:lower"])
    assert not compatible(["format:json", "format:bullets"])
    assert not compatible(["case:lower", "case:lower"])
    assert compatible(["case:lower", "format:bullets", "keywords:include"])


def test_pools_keep_constraints_satisfiable() -> None:
    words = INCLUDE_WORDS + END_PHRASES + POSTSCRIPT_MARKERS  # text a response may be required to contain
    assert not any(letter in w.lower() for w in words for letter in EXCLUDE_LETTERS)
    assert not set(INCLUDE_WORDS) & set(EXCLUDE_WORDS)


def test_descriptions_and_sampled_args() -> None:
    rng = random.Random(0)
    for cid, constraint in CONSTRAINTS.items():
        args = constraint.sample_args(rng)
        text = describe(cid, args)
        assert text and text[0].isupper()
        check(cid, args, "Some response.")  # must not raise on sampled args
