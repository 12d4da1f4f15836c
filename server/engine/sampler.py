"""Token sampling: penalties, temperature, top-k, top-p, per-sequence seeds, logprobs.

In: float32 logits [rows, vocab] and each row's sequence. Out: one token id per row
plus optional logprobs. Logprobs are those of the model's raw distribution (before
penalties and temperature), as vLLM reports them.

Batched: rows are grouped by what they need (penalties, min_p, greedy, temperature only, top-k/top-p,
logprobs) and each group costs a few torch ops for all of its rows; a batch of plain greedy
rows is one argmax. A random row is an exponential race, argmax p_i / e_i, whose Exp(1) noise
is counter-based (server/engine/draws.py): keyed by the sequence's seed and draw count, so a
seeded row's token does not depend on the rest of the batch. The only state is each
sequence's `num_draws`, advanced by one per random draw.
"""
from __future__ import annotations

import itertools
import math

import torch

from kernels.fused import argmax_rows
from server.engine.draws import draw_key, race_noise
from server.engine.messages import TokenLogprob
from server.engine.sequence import SamplingParams, Sequence

# Candidate windows (top-`width` tokens per row) tried for top-k/top-p rows before a full sort.
WINDOWS = (64, 1024)


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _unique_pairs(rows: list[int], id_lists: list[list[int]], vocab: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct (row, token id) pairs of ragged per-row token lists and how often each occurs."""
    lengths = torch.tensor([len(ids) for ids in id_lists], dtype=torch.long, device=device)
    ids = torch.tensor(list(itertools.chain.from_iterable(id_lists)), dtype=torch.long, device=device)
    keys, counts = torch.unique(torch.repeat_interleave(_index(rows, device), lengths) * vocab + ids,
                                return_counts=True)
    return keys // vocab, keys % vocab, counts


def needs_penalties(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty != 1.0 or (
        (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and seq.num_output_tokens > 0)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty (prompt + output, as HF and vLLM), then OpenAI presence/frequency
    penalties over each sequence's generated tokens. In place on `logits` [len(seqs), vocab],
    which it returns; only the (row, token) pairs a history holds are touched."""
    device, dtype, vocab = logits.device, logits.dtype, logits.shape[1]
    rep = [r for r, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if rep:
        rows, ids, _ = _unique_pairs(rep, [seqs[r].token_ids for r in rep], vocab, device)
        penalty = torch.tensor([s.params.repetition_penalty for s in seqs], dtype=dtype, device=device)[rows]
        vals = logits[rows, ids]
        logits[rows, ids] = torch.where(vals < 0, vals * penalty, vals / penalty)
    freq = [r for r, s in enumerate(seqs) if s.num_output_tokens > 0
            and (s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0)]
    if freq:
        rows, ids, counts = _unique_pairs(freq, [seqs[r].output_token_ids for r in freq], vocab, device)
        frequency = torch.tensor([s.params.frequency_penalty for s in seqs], dtype=dtype, device=device)[rows]
        presence = torch.tensor([s.params.presence_penalty for s in seqs], dtype=dtype, device=device)[rows]
        logits[rows, ids] -= frequency * counts.to(dtype) + presence
    return logits


def apply_min_p(scores: torch.Tensor, params: list[SamplingParams], rows: list[int]) -> torch.Tensor:
    """vLLM's min_p, in place on `scores`: after temperature T a token stays if p_i >= min_p * p_max,
    i.e. z_i >= z_max + T log(min_p) on the (penalized) logits; the top token always stays."""
    sel = _index(rows, scores.device)
    x = scores[sel]
    cut = torch.tensor([params[r].temperature * math.log(params[r].min_p) for r in rows],
                       dtype=scores.dtype, device=scores.device)
    scores[sel] = x.masked_fill(x < x.max(-1, keepdim=True).values + cut[:, None], float("-inf"))
    return scores


def _is_filtered(p: SamplingParams, vocab: int) -> bool:
    return 0 < p.top_k < vocab or p.top_p < 1.0


def _next_draws(scores: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> tuple[torch.Tensor, list[int]]:
    """The temperature-scaled logits of `rows` and the key of each one's next draw (which
    advances its sequence's draw count)."""
    temperature = torch.tensor([seqs[r].params.temperature for r in rows], dtype=scores.dtype, device=scores.device)
    keys = []
    for r in rows:
        keys.append(draw_key(seqs[r].seed, seqs[r].num_draws))
        seqs[r].num_draws += 1
    return scores[_index(rows, scores.device)] / temperature[:, None], keys


def _race(x: torch.Tensor, keys: list[int]) -> torch.Tensor:
    """Tokens of an exponential race over whole rows of temperature-scaled logits [rows, vocab]."""
    probs = torch.softmax(x, dim=-1)
    return argmax_rows(probs.div_(race_noise(keys, torch.arange(x.shape[1], device=x.device))))


def _race_filtered(x: torch.Tensor, params: list[SamplingParams], keys: list[int]) -> torch.Tensor:
    """Tokens of an exponential race over each row's top-k set, then its top-p nucleus
    (ties at the k-th value stay in; a token stays if the mass before it is < top_p, so the
    top token always does). Candidates come from the `width` largest logits while that window
    provably holds every kept token, else from a wider one, at last from a full sort."""
    num_rows, vocab = x.shape
    device = x.device
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], dtype=x.dtype, device=device)
    k_off = top_k == vocab
    k_max = max((p.top_k for p in params if 0 < p.top_k < vocab), default=0)
    lse_all = x.logsumexp(-1) if any(not 0 < p.top_k < vocab for p in params) else None  # top-p-only rows
    first = max(WINDOWS[0], k_max + 1)  # room for a top-k set and one token beyond it
    widths = sorted({w for w in (first, *WINDOWS) if first <= w < vocab} | {vocab})
    tokens = torch.empty(num_rows, dtype=torch.long, device=device)
    need = [0.0] * num_rows  # the narrowest window that could hold a row's kept tokens
    todo = list(range(num_rows))
    for width in widths:
        rows = [r for r in todo if need[r] <= width or width == vocab]
        if not rows:
            continue
        sel = _index(rows, device)
        xs = x if len(rows) == num_rows else x[sel]
        k, p, off = top_k[sel], top_p[sel], k_off[sel]
        if width < vocab:
            vals, ids = torch.topk(xs, width, dim=-1)  # [rows, width], descending
        else:
            vals, ids = torch.sort(xs, dim=-1, descending=True)
        kth = vals.gather(1, (k.clamp(max=width) - 1)[:, None])
        in_k = vals >= kth
        # The whole top-k set is in the window iff the window ends below the k-th value.
        k_inside = (k <= width) & (vals[:, -1] < kth[:, 0]) if width < vocab else torch.ones_like(off)
        lse = vals.masked_fill(~in_k, float("-inf")).logsumexp(-1)
        if lse_all is not None:
            lse = torch.where(k_inside, lse, lse_all[sel])
        probs = (vals - lse[:, None]).exp_().masked_fill_(~in_k, 0.0)
        cum = probs.cumsum(-1)
        keep = in_k & (cum - probs < p[:, None])
        # Done when nothing past the window is kept: outside the top-k set, or past the nucleus.
        covered = k_inside | (off & (cum[:, -1] >= p))
        # A top-p row short of its mass needs at least this many more tokens, none of them
        # likelier than the window's last: skip windows that cannot be wide enough. (-1: done)
        short = torch.where(off, (p - cum[:, -1]) / probs[:, -1], torch.ones_like(p)).masked_fill_(covered, -1.0)
        done = []
        for i, more in enumerate(short.tolist()):
            if more < 0:
                done.append(i)
            else:
                need[rows[i]] = width + more
        if done:
            at = _index(done, device)
            cand = ids[at]
            score = probs[at].div_(race_noise([keys[rows[i]] for i in done], cand)).masked_fill_(~keep[at], -1.0)
            tokens[sel[at]] = cand.gather(1, score.argmax(-1, keepdim=True))[:, 0]
        finished = {rows[i] for i in done}
        todo = [r for r in todo if r not in finished]
        if not todo:
            break
    return tokens


def _logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: torch.Tensor,
              token_list: list[int]) -> list[TokenLogprob | None]:
    """The chosen token's raw logprob and the top-k alternatives, for the rows that ask."""
    out: list[TokenLogprob | None] = [None] * len(params)
    rows = [r for r, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    sel = _index(rows, logits.device)
    raw = logits if len(rows) == len(params) else logits[sel]
    # NOTE: methods may mask tokens to -inf; JSON has no -inf, so report vLLM's -9999.
    lp = torch.log_softmax(raw, dim=-1).clamp_(min=-9999.0)
    chosen = lp.gather(1, tokens[sel][:, None])[:, 0].tolist()
    k_max = max(params[r].logprobs for r in rows)
    top_ids: list[list[int]] = [[] for _ in rows]
    top_vals: list[list[float]] = [[] for _ in rows]
    if k_max > 0:
        top = torch.topk(lp, k_max, dim=-1)
        top_ids, top_vals = top.indices.tolist(), top.values.tolist()
    for i, r in enumerate(rows):
        k = params[r].logprobs
        out[r] = TokenLogprob(token_id=token_list[r], logprob=chosen[i],
                              top=list(zip(top_ids[i][:k], top_vals[i][:k])))
    return out


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Pick the next token of each row.

    Greedy rows take the argmax of their (penalized) logits. Other rows run an exponential race
    (one draw per step) with noise from their sequence's seed and draw count, which makes a
    seed's text independent of what else is in the batch. `logits` is not modified.
    """
    num_rows, vocab = logits.shape
    device = logits.device
    params = [s.params for s in seqs]
    scores = apply_penalties(logits.clone(), seqs) if any(needs_penalties(s) for s in seqs) else logits
    min_p = [r for r, p in enumerate(params) if p.min_p > 0.0 and not p.is_greedy]
    if min_p:
        scores = apply_min_p(scores if scores is not logits else logits.clone(), params, min_p)
    greedy = [r for r, p in enumerate(params) if p.is_greedy]
    if len(greedy) == num_rows:
        tokens = argmax_rows(scores)
    else:
        tokens = torch.empty(num_rows, dtype=torch.long, device=device)
        if greedy:
            sel = _index(greedy, device)
            tokens[sel] = argmax_rows(scores[sel])
        plain = [r for r, p in enumerate(params) if not p.is_greedy and not _is_filtered(p, vocab)]
        filtered = [r for r, p in enumerate(params) if not p.is_greedy and _is_filtered(p, vocab)]
        if plain:
            x, keys = _next_draws(scores, seqs, plain)
            tokens[_index(plain, device)] = _race(x, keys)
        if filtered:
            x, keys = _next_draws(scores, seqs, filtered)
            tokens[_index(filtered, device)] = _race_filtered(x, [params[r] for r in filtered], keys)
    token_list = tokens.tolist()
    return token_list, _logprobs(logits, params, tokens, token_list)
