"""Verifiable instruction constraints (IFEval-style): one instruction text and one checker each.

In: a response string and a constraint's arguments. Out: pass/fail per constraint, or the
fraction of a prompt's constraints met. Each constraint also samples its own arguments from a
seeded `random.Random` and names the constraints it cannot be combined with. Prompt assembly
and the train/held-out split live in `instructions.py`; this module knows nothing about tasks.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

Args = dict[str, Any]

# NOTE: no required word or phrase contains an excludable letter (z, q, x), so any mix of constraints
# stays satisfiable; tests/train/test_constraints.py checks this invariant.
INCLUDE_WORDS = ("ocean", "river", "garden", "history", "music", "energy", "balance", "future",
                 "window", "silver", "harvest", "market", "science", "travel", "kitchen", "memory",
                 "mountain", "signal", "planet", "letter", "bridge", "candle", "forest", "engine")
EXCLUDE_WORDS = ("very", "really", "thing", "basically", "actually", "literally", "stuff", "nice")
EXCLUDE_LETTERS = ("z", "q", "x")
END_PHRASES = ("Is there anything else I can help with?", "Let me know if you need anything else.",
               "That is all.", "Hope this helps!")
POSTSCRIPT_MARKERS = ("P.S.", "P.P.S.")

_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
_BULLET = re.compile(r"^\s*(?:\*(?!\*)|-)\s+\S", re.MULTILINE)
_HIGHLIGHT = re.compile(r"\*[^\n*]+\*")
_PLACEHOLDER = re.compile(r"\[[^\]\n]+\]")
_TITLE = re.compile(r"<<[^\n<>]+>>")
_JSON_FENCE = re.compile(r"^```(?:json|JSON)?\s*\n?(.*?)\n?```$", re.DOTALL)


@dataclass(frozen=True)
class Constraint:
    """One verifiable instruction: how to phrase it, check it and sample its arguments."""

    id: str
    describe: Callable[[Args], str]
    check: Callable[[str, Args], bool]
    sample_args: Callable[[random.Random], Args] = lambda rng: {}
    conflicts: frozenset[str] = field(default_factory=frozenset)


def count_words(text: str) -> int:
    """Words are runs of letters/digits (an apostrophe suffix stays in the word)."""
    return len(_WORD.findall(text))


def count_sentences(text: str) -> int:
    """Sentences end at . ! or ? followed by whitespace or the end of the text."""
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return sum(1 for part in parts if _WORD.search(part))


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs are separated by one or more blank lines."""
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


def _word_count(text: str, word: str) -> int:
    return len(re.findall(rf"\b{re.escape(word)}\b", text, re.IGNORECASE))


def _is_json(text: str) -> bool:
    body = text.strip()
    fenced = _JSON_FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not body:
        return False
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _quoted(text: str) -> bool:
    body = text.strip()
    return len(body) > 1 and body[0] == '"' and body[-1] == '"'


def _has_letters(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


def _two_words(rng: random.Random, pool: Sequence[str]) -> Args:
    return {"keywords": sorted(rng.sample(list(pool), 2))}


_ALL_FORMAT = frozenset({"format:bullets", "format:title", "format:highlights", "length:paragraphs",
                         "ending:phrase", "startend:quotation", "content:postscript",
                         "punctuation:no_commas", "length:max_sentences"})

_CONSTRAINTS: tuple[Constraint, ...] = (
    Constraint(
        "length:max_words",
        lambda a: f"Answer in at most {a['n']} words.",
        lambda t, a: 0 < count_words(t) <= a["n"],
        lambda rng: {"n": rng.choice((20, 40, 60, 100))},
        frozenset({"length:min_words"})),
    Constraint(
        "length:min_words",
        lambda a: f"Answer in at least {a['n']} words.",
        lambda t, a: count_words(t) >= a["n"],
        lambda rng: {"n": rng.choice((30, 50, 80))},
        frozenset({"length:max_words", "length:max_sentences"})),
    Constraint(
        "length:max_sentences",
        lambda a: f"Use at most {a['n']} sentences.",
        lambda t, a: 0 < count_sentences(t) <= a["n"],
        lambda rng: {"n": rng.choice((2, 3, 5))},
        frozenset({"length:paragraphs", "length:min_words", "format:json"})),
    Constraint(
        "length:paragraphs",
        lambda a: f"Write exactly {a['n']} paragraphs, separated from each other by a blank line.",
        lambda t, a: len(split_paragraphs(t)) == a["n"],
        lambda rng: {"n": rng.choice((2, 3, 4))},
        frozenset({"length:max_sentences", "format:json"})),
    Constraint(
        "keywords:include",
        lambda a: f"Include the keywords '{a['keywords'][0]}' and '{a['keywords'][1]}' in your response.",
        lambda t, a: all(_has_word(t, w) for w in a["keywords"]),
        lambda rng: _two_words(rng, INCLUDE_WORDS)),
    Constraint(
        "keywords:exclude",
        lambda a: f"Do not use the words '{a['keywords'][0]}' or '{a['keywords'][1]}'.",
        lambda t, a: _has_letters(t) and not any(_has_word(t, w) for w in a["keywords"]),
        lambda rng: _two_words(rng, EXCLUDE_WORDS)),
    Constraint(
        "keywords:frequency",
        lambda a: f"Use the word '{a['keyword']}' at least {a['n']} times.",
        lambda t, a: _word_count(t, a["keyword"]) >= a["n"],
        lambda rng: {"keyword": rng.choice(INCLUDE_WORDS), "n": rng.choice((2, 3))}),
    Constraint(
        "letters:exclude",
        lambda a: f"Do not use the letter '{a['letter']}' anywhere in your response.",
        lambda t, a: _has_letters(t) and a["letter"] not in t.lower(),
        lambda rng: {"letter": rng.choice(EXCLUDE_LETTERS)}),
    Constraint(
        "case:lower",
        lambda a: "Your entire response must be in lowercase letters; no capital letters are allowed.",
        lambda t, a: _has_letters(t) and t == t.lower(),
        conflicts=frozenset({"case:upper", "ending:phrase"})),
    Constraint(
        "case:upper",
        lambda a: "Your entire response must be in English and in all capital letters.",
        lambda t, a: _has_letters(t) and t == t.upper(),
        conflicts=frozenset({"case:lower", "ending:phrase", "format:json"})),
    Constraint(
        "ending:phrase",
        lambda a: (f"Finish your response with the exact phrase \"{a['phrase']}\". "
                   "No other words should follow it."),
        lambda t, a: t.strip().endswith(a["phrase"]),
        lambda rng: {"phrase": rng.choice(END_PHRASES)},
        frozenset({"case:lower", "case:upper", "format:json", "startend:quotation",
                   "content:postscript"})),
    Constraint(
        "format:bullets",
        lambda a: (f"Your answer must contain exactly {a['n']} bullet points. "
                   "Use markdown bullets such as:\n* This is a point."),
        lambda t, a: len(_BULLET.findall(t)) == a["n"],
        lambda rng: {"n": rng.choice((2, 3, 4, 5))},
        frozenset({"format:json", "format:highlights"})),
    Constraint(
        "format:json",
        lambda a: "Wrap your entire output in JSON format. You may use markdown ticks such as ```.",
        lambda t, a: _is_json(t),
        conflicts=_ALL_FORMAT | {"case:upper"}),
    Constraint(
        "punctuation:no_commas",
        lambda a: "In your entire response, refrain from the use of any commas.",
        lambda t, a: _has_letters(t) and "," not in t,
        conflicts=frozenset({"format:json"})),
    Constraint(
        "format:title",
        lambda a: "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
        lambda t, a: _TITLE.search(t) is not None,
        conflicts=frozenset({"format:json"})),
    Constraint(
        "startend:quotation",
        lambda a: "Wrap your entire response with double quotation marks.",
        lambda t, a: _quoted(t),
        conflicts=frozenset({"format:json", "ending:phrase", "content:postscript"})),
    Constraint(
        "content:postscript",
        lambda a: f"At the end of your response, please explicitly add a postscript starting with {a['marker']}",
        lambda t, a: re.search(rf"^\s*{re.escape(a['marker'])}", t, re.MULTILINE | re.IGNORECASE) is not None,
        lambda rng: {"marker": rng.choice(POSTSCRIPT_MARKERS)},
        frozenset({"format:json", "ending:phrase", "startend:quotation"})),
    Constraint(
        "format:highlights",
        lambda a: (f"Highlight at least {a['n']} sections in your answer with markdown, "
                   "i.e. *highlighted section*."),
        lambda t, a: len(_HIGHLIGHT.findall(t)) >= a["n"],
        lambda rng: {"n": rng.choice((1, 2, 3))},
        frozenset({"format:json", "format:bullets"})),
    Constraint(
        "content:placeholders",
        lambda a: (f"The response must contain at least {a['n']} placeholders represented by "
                   "square brackets, such as [address]."),
        lambda t, a: len(_PLACEHOLDER.findall(t)) >= a["n"],
        lambda rng: {"n": rng.choice((1, 2, 3))}),
)

CONSTRAINTS: Mapping[str, Constraint] = MappingProxyType({c.id: c for c in _CONSTRAINTS})


def _symmetric_conflicts(a: str, b: str) -> bool:
    return b in CONSTRAINTS[a].conflicts or a in CONSTRAINTS[b].conflicts


def compatible(ids: Sequence[str]) -> bool:
    """True when no two of the constraint ids conflict (conflicts are treated as symmetric)."""
    return all(not _symmetric_conflicts(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]) \
        and len(set(ids)) == len(ids)


def get_constraint(constraint_id: str) -> Constraint:
    """Look up a constraint, with a clear error for unknown ids."""
    try:
        return CONSTRAINTS[constraint_id]
    except KeyError:
        raise KeyError(f"unknown constraint id {constraint_id!r}; known: {sorted(CONSTRAINTS)}") from None


def describe(constraint_id: str, args: Args) -> str:
    """The instruction sentence for one constraint."""
    return get_constraint(constraint_id).describe(args)


def check(constraint_id: str, args: Args, response: str) -> bool:
    """Whether `response` satisfies one constraint."""
    return bool(get_constraint(constraint_id).check(response, args))


def check_all(constraints: Sequence[Mapping[str, Any]], response: str) -> list[bool]:
    """Pass/fail per constraint; each item is `{"id": ..., "args": {...}}`."""
    return [check(c["id"], dict(c.get("args", {})), response) for c in constraints]


def score(constraints: Sequence[Mapping[str, Any]], response: str) -> float:
    """Fraction of constraints met (1.0 for an empty list)."""
    results = check_all(constraints, response)
    return sum(results) / len(results) if results else 1.0
