"""Token constraints and logit rules: per-request edits of the scores of every row, applied
just before sampling (after any method has rewritten them).

Two kinds of object, both read only the sequence (its output token ids), so a fork, a rewind
or a preemption needs nothing from them:

- a constraint (`SamplingParams.constraint`, one per request) says which tokens may come
  next: `allowed_tokens(seq)` returns None (no restriction this step), a list of token ids,
  a bool tensor [vocab], or a packed int32 bitmask [ceil(vocab / 32)] (bit j of word i
  allows token 32 i + j, xgrammar's layout). Extractive RAG (server/methods/extractive.py)
  and structured output (server/methods/structured.py) are constraints.
- a logit rule (`SamplingParams.logit_rules`, any number) adds to the scores:
  `bias(seq)` returns None or `(token ids, values)`, -inf bans a token. logit_bias,
  min_tokens, bad_words and allowed_token_ids are rules (server/engine/logit_rules.py).

Biases are added first, then the constraint masks; a row whose biases leave nothing the
constraint allows gets the constraint alone (the structure is a promise, a bias a
preference), and a row whose scores leave nothing (a method's cut) gets the allowed tokens
at equal scores: a constrained row never samples a disallowed token. Packed masks of all rows are unpacked in one op; rows with neither kind pay
two attribute checks and the batch is not copied.
"""
from __future__ import annotations

from typing import Protocol

import torch

from server.engine.sequence import Sequence


class TokenConstraint(Protocol):
    def allowed_tokens(self, seq: Sequence) -> list[int] | torch.Tensor | None: ...


class LogitRule(Protocol):
    def bias(self, seq: Sequence) -> tuple[list[int] | torch.Tensor, float | list[float] | torch.Tensor] | None: ...


def constrain(logits: torch.Tensor, seqs: list[Sequence], rules: bool = True) -> torch.Tensor:
    """`logits` [len(seqs), vocab] with every row's biases added and every disallowed token
    of a constrained row at -inf (a new tensor when any row has either; `logits` itself is
    not modified). `rules=False`: the constraints alone, for a method whose own cut must lie
    inside the allowed set (DoLa's plausible head)."""
    masks: list[tuple[int, list[int] | torch.Tensor]] = []
    biases: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for r, s in enumerate(seqs):
        p = s.params
        if p.constraint is not None:
            allowed = p.constraint.allowed_tokens(s)
            if allowed is not None:
                masks.append((r, allowed))
        for rule in p.logit_rules if rules else ():
            b = rule.bias(s)
            if b is not None:
                ids = torch.as_tensor(b[0], dtype=torch.long)
                biases.append((r, ids, torch.as_tensor(b[1], dtype=logits.dtype).expand(ids.shape)))
    if not masks and not biases:
        return logits
    out = logits
    if biases:
        out = logits.clone()
        rows = torch.cat([torch.full_like(ids, r) for r, ids, _ in biases]).to(out.device)
        ids = torch.cat([ids for _, ids, _ in biases]).to(out.device)
        out.index_put_((rows, ids), torch.cat([v for _, _, v in biases]).to(out.device), accumulate=True)
    if masks:
        # Additive 0 / -inf rows: one branch-free add (a masked_fill over a ragged mask is slower).
        penalty = _penalty(masks, logits.shape[1], out.device, out.dtype)
        every = len(masks) == len(seqs)  # rows in order: no gather / scatter needed
        index = None if every else torch.tensor([r for r, _ in masks], dtype=torch.long, device=out.device)
        masked = (out if every else out[index]) + penalty
        dead = torch.isneginf(masked).all(-1, keepdim=True)
        if bool(dead.any()):  # nothing allowed has a finite score left
            if biases:
                masked = torch.where(dead, (logits if every else logits[index]) + penalty, masked)
                dead = torch.isneginf(masked).all(-1, keepdim=True)
            # A method's cut (or the scores) left nothing allowed: the allowed tokens, level.
            masked = torch.where(dead, penalty, masked)
        if every:
            return masked
        out = out if biases else logits.clone()
        out[index] = masked
    return out


def _penalty(masks: list[tuple[int, list[int] | torch.Tensor]], vocab: int, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
    """[len(masks), vocab]: 0 where a constrained row allows the token, -inf elsewhere."""
    kinds = [_kind(a) for _, a in masks]
    packed = [i for i, k in enumerate(kinds) if k == "packed"]
    bits = None
    if packed:
        # Each byte of the little-endian words looked up as its 8 penalties: one gather.
        words = torch.stack([masks[i][1] for i in packed]).to(device, non_blocking=True)
        table = _byte_penalties(device, dtype)
        bits = table.index_select(0, words.view(torch.uint8).reshape(-1).long()).view(len(packed), -1)
        if bits.shape[1] != vocab:  # past the mask's end nothing is allowed
            bits = torch.nn.functional.pad(bits[:, :vocab], (0, max(0, vocab - bits.shape[1])), value=float("-inf"))
        if len(packed) == len(masks):
            return bits
    out = torch.full((len(masks), vocab), float("-inf"), dtype=dtype, device=device)
    if bits is not None:
        out[torch.tensor(packed, device=device)] = bits
    lists = [i for i, k in enumerate(kinds) if k == "list"]
    if lists:
        ids = [torch.as_tensor(masks[i][1], dtype=torch.long).reshape(-1) for i in lists]
        rows = torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, t in zip(lists, ids)]).to(device)
        out[rows, torch.cat(ids).to(device)] = 0.0
    for i in [i for i, k in enumerate(kinds) if k == "bool"]:
        out[i].masked_fill_(masks[i][1].to(device), 0.0)
    return out


def _kind(allowed) -> str:
    if not isinstance(allowed, torch.Tensor):
        return "list"
    if allowed.dtype in (torch.bool, torch.int32):
        return "bool" if allowed.dtype == torch.bool else "packed"
    raise TypeError("allowed_tokens must return None, a list of ids, a bool mask or an int32 bitmask")


_BYTE_PENALTIES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _byte_penalties(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: 0 where bit j of byte value b is set, else -inf."""
    key = (device, dtype)
    if key not in _BYTE_PENALTIES:
        bits = (torch.arange(256, dtype=torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)) & 1
        _BYTE_PENALTIES[key] = torch.zeros(256, 8, dtype=dtype).masked_fill_(bits == 0, float("-inf")).to(device)
    return _BYTE_PENALTIES[key]
