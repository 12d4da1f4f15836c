"""RAIN's evaluators: what a search node's text is worth, v in [-1, 1] (server.methods.rain).

Each `judge(ctx, items)` is a generator over the search context's primitives (spawn, fork,
extend, readout, score, release) that returns one value per (text, token ids) item:
- SelfEvaluator: the model answers our few-shot harmless/harmful prompt in both option orders,
  each voting by P('A') vs P('B'); v = votes - 1 in {-1, 0, 1};
- RewardEvaluator: a reward-model adapter's score squashed by tanh;
- RuleEvaluator: a rule on the text, no model call (tests).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any

import torch

from server.methods.best_of_n import strip_padding

HARMLESS_FIRST = "Options:\n(A) The reply is harmless.\n(B) The reply is harmful.\nThe answer is: ("
HARMFUL_FIRST = "Options:\n(A) The reply is harmful.\n(B) The reply is harmless.\nThe answer is: ("
FEW_SHOT = ("Decide whether the assistant's reply in each conversation is harmless or harmful.\n\n"
            "Human: How do I keep basil fresh?\nAssistant: Put the stems in a glass of water, like cut flowers.\n"
            f"{HARMLESS_FIRST}A)\n\n"
            "Human: Which cleaners make a poisonous gas?\nAssistant: Mix bleach and ammonia in a closed room.\n"
            f"{HARMFUL_FIRST}A)\n\n"
            "Human: Help me write a threatening note to my neighbour.\n"
            "Assistant: I won't help threaten anyone, but I can help you write a calm note.\n"
            f"{HARMFUL_FIRST}B)")


def option_token_ids(hf, letter: str) -> list[int]:
    """Ids that answer `letter` after "(": the last piece of "(A", and "A" / " A" as tokens."""
    ids = {hf.encode(t, add_special_tokens=False)[-1] for t in ("(" + letter, letter, " " + letter)}
    ids = sorted(i for i in ids if hf.decode([i]).strip() == letter)
    if not ids:
        raise ValueError(f"the tokenizer has no token for option {letter!r}")
    return ids


class SelfEvaluator:
    """The model judges "Human: q / Assistant: reply" after our few-shot prompt, once per
    option order: the shared part is prefilled once and forked into the two orders."""

    name = "self"

    def __init__(self, tokenizer, question: str) -> None:
        hf = tokenizer.hf
        self.tokenizer, self.question = tokenizer, question
        self.orders = [hf.encode(o, add_special_tokens=False) for o in (HARMLESS_FIRST, HARMFUL_FIRST)]
        self.a_ids, self.b_ids = option_token_ids(hf, "A"), option_token_ids(hf, "B")

    def head(self, reply: str) -> list[int]:
        return self.tokenizer.encode(f"{FEW_SHOT}\n\nHuman: {self.question}\nAssistant: {reply.lstrip()}\n")

    def a_wins(self, harmless_first: torch.Tensor, harmful_first: torch.Tensor) -> list[bool]:
        """Per option order, whether 'A' beats 'B' in the next-token logits."""
        return [bool(z[self.a_ids].max() > z[self.b_ids].max()) for z in (harmless_first, harmful_first)]

    def vote(self, harmless_first: torch.Tensor, harmful_first: torch.Tensor) -> float:
        """Each order votes 1 when its harmless option wins; v = 2 (mean vote - 1/2)."""
        a_wins = self.a_wins(harmless_first, harmful_first)
        return float(a_wins[0] + (not a_wins[1]) - 1)

    def judge(self, ctx, items: list[tuple[str, list[int]]]) -> Generator[Any, Any, list[float]]:
        bases = [ctx.spawn(self.head(text)) for text, _ in items]
        yield ctx.readout(bases)
        pairs = []
        for base in bases:
            for seq, suffix in zip(ctx.fork(base, 2), self.orders):
                ctx.extend(seq, suffix)
                pairs.append(seq)
            ctx.release(base)
        reads = yield ctx.readout(pairs)
        for seq in pairs:
            ctx.release(seq)
        return [self.vote(a.logits, b.logits) for a, b in zip(reads[::2], reads[1::2])]


class RewardEvaluator:
    """v = tanh(score) of a reward-model adapter on [prompt, reply], rendered as it was trained
    (`render(reply)`, as BestOfN's) or else the sequence's own token ids."""

    def __init__(self, name: str, adapter_id: int, render: Callable[[str], list[int]] | None,
                 pad_token_id: int | None) -> None:
        self.name, self.adapter_id, self.render, self.pad_token_id = name, adapter_id, render, pad_token_id

    def judge(self, ctx, items: list[tuple[str, list[int]]]) -> Generator[Any, Any, list[float]]:
        inputs = [self.render(text) if self.render else ids for text, ids in items]
        scores = yield ctx.score([strip_padding(ids, self.pad_token_id) for ids in inputs], self.adapter_id)
        return [math.tanh(s) for s in scores]


class RuleEvaluator:
    """v = rule(reply text), no model call (tests)."""

    name = "rule"

    def __init__(self, rule: Callable[[str], float]) -> None:
        self.rule = rule

    def judge(self, ctx, items: list[tuple[str, list[int]]]) -> Generator[Any, Any, list[float]]:
        return [float(self.rule(text)) for text, _ in items]
        yield  # NOTE: unreachable; makes this a generator like the others
