"""Prompt logprobs: log p(token_i | tokens_<i) at every prompt position (None for the first),
from the final-norm hidden states the runner returned as prompt taps.

What OpenAI's legacy `echo` + `logprobs` and vLLM's `prompt_logprobs` report, and what
perplexity through the API needs. A request's method may rewrite these scores as it rewrites
sampled ones (`LogitMethod.adjust_prompt`: kNN-LM mixes its datastore in); others leave them
the base model's. Logits are made a slice of positions at a time, so a long prompt never holds
[prompt, vocab] floats at once.
"""
from __future__ import annotations

import torch

from server.engine.messages import TokenLogprob
from server.models.llama import FINAL_NORM_TAP

SLICE = 256


@torch.inference_mode()
def prompt_logprobs(model, seq, taps: dict[int, torch.Tensor], top_k: int) -> list[TokenLogprob | None]:
    ids = seq.token_ids[:seq.num_prompt_tokens]
    hidden = taps[FINAL_NORM_TAP]
    method = seq.request.method
    out: list[TokenLogprob | None] = [None]
    for a in range(0, len(ids) - 1, SLICE):
        b = min(a + SLICE, len(ids) - 1)
        logits = model.compute_logits(hidden[a:b].to(model.dtype))
        if method is not None:
            logits = method.adjust_prompt(seq, logits, {t: v[a:b] for t, v in taps.items()})
        lp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(ids[a + 1:b + 1], dtype=torch.long, device=lp.device)
        chosen = lp.gather(1, target[:, None])[:, 0]
        ranks = (lp > chosen[:, None]).sum(-1) + 1
        tops = torch.topk(lp, top_k, dim=-1) if top_k > 0 else None
        for i in range(b - a):
            top = list(zip(tops.indices[i].tolist(), tops.values[i].tolist())) if tops is not None else []
            out.append(TokenLogprob(ids[a + 1 + i], float(chosen[i]), top, int(ranks[i])))
    return out
