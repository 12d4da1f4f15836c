"""Token sampling: penalties, temperature, top-k, top-p, per-sequence seeds, logprobs.

In: float32 logits [rows, vocab] and each row's sequence. Out: one token id per row
plus optional logprobs. Logprobs are those of the model's raw distribution (before
penalties and temperature), as vLLM reports them.
"""
from __future__ import annotations

import torch

from server.engine.messages import TokenLogprob
from server.engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty (prompt + output, as HF and vLLM), then OpenAI presence/frequency
    penalties over each sequence's generated tokens."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals < 0, vals * p.repetition_penalty, vals / p.repetition_penalty)
        if (p.presence_penalty == 0.0 and p.frequency_penalty == 0.0) or seq.num_output_tokens == 0:
            continue
        counts = torch.bincount(torch.tensor(seq.output_token_ids, device=logits.device),
                                minlength=logits.shape[1]).to(logits.dtype)
        logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask one row's logits outside the top-k set and the top-p nucleus with -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep a token if the mass before it is < top_p (the top token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Pick the next token of each row.

    Seeded rows draw from their sequence's own generator (exponential race, so one draw
    per step), which makes a seed's text independent of what else is in the batch.
    """
    raw_logprobs = None
    if any(s.params.logprobs is not None for s in seqs):
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    logits = apply_penalties(logits.clone(), seqs)
    tokens: list[int] = []
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.is_greedy:
            tokens.append(int(torch.argmax(logits[row])))
            continue
        row_logits = _filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = row_logits.softmax(-1)
        noise = torch.empty_like(probs).exponential_(generator=seq.generator)
        tokens.append(int(torch.argmax(probs / noise)))
    logprobs: list[TokenLogprob | None] = []
    for row, seq in enumerate(seqs):
        k = seq.params.logprobs
        if k is None or raw_logprobs is None:
            logprobs.append(None)
            continue
        # NOTE: methods may mask tokens to -inf; JSON has no -inf, so report vLLM's -9999.
        lp = raw_logprobs[row].clamp(min=-9999.0)
        top = torch.topk(lp, k) if k > 0 else None
        logprobs.append(TokenLogprob(
            token_id=tokens[row], logprob=float(lp[tokens[row]]),
            top=list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [],
        ))
    return tokens, logprobs
