"""Token constraints: a per-request rule of which tokens may come next, applied to the scores
of every row just before sampling (after any method has rewritten them).

A constraint (`SamplingParams.constraint`) is any object with
`allowed_tokens(seq) -> list[int] | None` (None: no restriction this step). It reads the
sequence's output token ids, so a fork, a rewind or a preemption needs nothing from it;
extractive RAG (server/methods/extractive.py) is one, structured output is the next. Rows
without a constraint pay one attribute check.
"""
from __future__ import annotations

from typing import Protocol

import torch

from server.engine.sequence import Sequence


class TokenConstraint(Protocol):
    def allowed_tokens(self, seq: Sequence) -> list[int] | None: ...


def constrain(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """`logits` [len(seqs), vocab] with every disallowed token of a constrained row at -inf
    (a new tensor when any row is constrained; `logits` itself is not modified)."""
    rows = [(r, s.params.constraint.allowed_tokens(s)) for r, s in enumerate(seqs)
            if s.params.constraint is not None]
    rows = [(r, allowed) for r, allowed in rows if allowed is not None]
    if not rows:
        return logits
    device = logits.device
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for r, allowed in rows:
        keep[r, torch.tensor(allowed, dtype=torch.long, device=device)] = True
    unconstrained = torch.ones(len(seqs), dtype=torch.bool, device=device)
    unconstrained[torch.tensor([r for r, _ in rows], dtype=torch.long, device=device)] = False
    keep |= unconstrained[:, None]
    return logits.masked_fill(~keep, float("-inf"))
