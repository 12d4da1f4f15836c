"""Logit rules: additive per-token scores of one request (server/engine/constraints.py applies
them before sampling). Each rule reads only the sequence, so forks and rewinds need nothing.

OpenAI's `logit_bias` and vLLM's `min_tokens`, `bad_words` and `allowed_token_ids` are rules;
`build_rules` makes a request's from its fields. A ban is a bias of -inf.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from server.engine.sequence import Sequence

NEG_INF = float("-inf")


class LogitBias:
    """OpenAI `logit_bias`: a fixed value added to each listed token's logit, every step."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def bias(self, seq: Sequence):
        return self.ids, self.values


class MinTokens:
    """vLLM `min_tokens`: the end tokens (EOS and the request's stop_token_ids) are banned
    until the output has `n` tokens."""

    def __init__(self, n: int, end_token_ids: Iterable[int]) -> None:
        self.n = n
        self.ids = torch.tensor(sorted(set(end_token_ids)), dtype=torch.long)

    def bias(self, seq: Sequence):
        return (self.ids, NEG_INF) if seq.num_output_tokens < self.n else None


class AllowedTokens:
    """vLLM `allowed_token_ids`: every other token is banned (kept as a rule, not the request's
    constraint, so it composes with a grammar: the row may take what both allow)."""

    def __init__(self, allowed: Iterable[int], vocab_size: int) -> None:
        keep = torch.zeros(vocab_size, dtype=torch.bool)
        keep[torch.tensor(sorted(set(allowed)), dtype=torch.long)] = True
        self.banned = torch.nonzero(~keep).flatten()

    def bias(self, seq: Sequence):
        return self.banned, NEG_INF


class BadWords:
    """vLLM `bad_words`: a word's last token is banned wherever the output ends with the rest
    of the word (a one-token word is banned everywhere)."""

    def __init__(self, token_seqs: Iterable[list[int]]) -> None:
        self.words = sorted({tuple(t) for t in token_seqs if t})

    def bias(self, seq: Sequence):
        out = seq.output_token_ids
        banned = {w[-1] for w in self.words
                  if len(w) == 1 or (len(out) >= len(w) - 1 and tuple(out[len(out) - len(w) + 1:]) == w[:-1])}
        return (sorted(banned), NEG_INF) if banned else None


def bad_word_token_seqs(tokenizer, words: Iterable[str]) -> list[list[int]]:
    """Each word's tokens as it starts the text and after a space (as vLLM encodes them, so a
    word is caught at the start of the output and in the middle of it)."""
    seqs = []
    for word in words:
        for prefix in ("", " "):
            ids = tokenizer.hf.encode(prefix + word.lstrip(), add_special_tokens=False)
            if ids:
                seqs.append(ids)
    return seqs


class RuleError(ValueError):
    """A rule's field is out of range: 400 naming `param`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def build_rules(*, logit_bias: dict[str, float] | None = None, min_tokens: int = 0, max_tokens: int = 0,
                end_token_ids: Iterable[int] = (), allowed_token_ids: Iterable[int] | None = None,
                bad_words: list[list[int]] | None = None, vocab_size: int = 0) -> tuple:
    """A request's rules from its fields (types checked by the API's models; token ids are
    checked here against the model's vocabulary); () when it asks for none."""
    rules: list = []
    if logit_bias:
        bias = {int(k): float(v) for k, v in logit_bias.items()}
        if any(not 0 <= t < vocab_size for t in bias):
            raise RuleError("logit_bias", f"logit_bias keys must be token ids in [0, {vocab_size})")
        rules.append(LogitBias(bias))
    if min_tokens > max_tokens:
        raise RuleError("min_tokens", f"min_tokens ({min_tokens}) must be at most max_tokens ({max_tokens})")
    if min_tokens > 0:
        rules.append(MinTokens(min_tokens, end_token_ids))
    if allowed_token_ids is not None:
        if any(not 0 <= t < vocab_size for t in allowed_token_ids):
            raise RuleError("allowed_token_ids", f"allowed_token_ids must be in [0, {vocab_size})")
        rules.append(AllowedTokens(allowed_token_ids, vocab_size))
    if bad_words:
        rules.append(BadWords(bad_words))
    return tuple(rules)
