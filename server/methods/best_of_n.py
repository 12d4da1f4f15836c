"""Best-of-N, a search method: N candidates from one prefill (forked, decoded as one batch),
each scored by a reward-model adapter through the engine, the best n committed as outputs.

Scores: the RM's score head on [prompt, candidate] rendered as the RM was trained (chat:
the chat template over the conversation plus the assistant reply, no generation prompt;
completions: prompt ids + output ids), read at the last token that is not padding, as HF
sequence classifiers do. Without a reward model the score is the mean token log-prob
(OpenAI's legacy `best_of`). Ties go to the lower candidate index.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from server.methods.search import SearchMethod

if TYPE_CHECKING:
    from server.engine.engine import LLMEngine
    from server.engine.sequence import Request


class BestOfN(SearchMethod):
    """`best_of` candidates forked after one prefill; the best `n` are committed as the outputs.

    The candidates are seeded as the outputs of the same request with n = best_of would be,
    and their first tokens come from the one prefill row, so they are exactly those outputs.
    `render(text)` gives the token ids the reward model scores (the chat template over the
    conversation plus the reply); without it, prompt ids + output ids.
    """

    name = "best_of_n"

    def __init__(self, best_of: int, n: int = 1, reward_model: str | None = None,
                 render: Callable[[str], list[int]] | None = None, pad_token_id: int | None = None) -> None:
        super().__init__()
        self.best_of, self.n, self.reward_model = best_of, n, reward_model
        self.render, self.pad_token_id = render, pad_token_id
        self.streams_per_output = math.ceil(best_of / n)
        self.rm_id = 0
        self._report: dict[str, Any] = {}

    def prepare(self, engine: "LLMEngine") -> None:
        if self.reward_model is not None:
            self.rm_id = engine.resolve_adapter(self.reward_model, role="rm", param="reward_model")

    def run(self, ctx):
        root = ctx.output()
        outputs = [root] + (ctx.fork(root, self.n - 1, role="output") if self.n > 1 else [])
        [prefill] = yield ctx.readout([root])
        params = ctx.params
        # Mean-logprob ranking needs each token's logprob even if the client did not ask.
        logprobs = params.logprobs if params.logprobs is not None or self.reward_model else 0
        cands = ctx.fork(root, self.best_of, seed_indices=list(range(self.best_of)),
                         params=dataclasses.replace(params, n=1, logprobs=logprobs))
        ctx.sample_from(cands, prefill.logits)
        yield ctx.sample(cands, params.max_tokens)
        if self.reward_model is None:
            scores = [mean_logprob(c) for c in cands]
        else:
            prompt = root.token_ids[:root.num_prompt_tokens]
            inputs = [self.render(c.output_text) if self.render else prompt + c.output_token_ids for c in cands]
            scores = yield ctx.score([strip_padding(ids, self.pad_token_id) for ids in inputs], self.rm_id)
        order = rank(scores)
        self._report = report(cands, scores, order, self.n, self.reward_model)
        for output, chosen in zip(outputs, order):
            ctx.commit(output, cands[chosen])
        for cand in cands:
            ctx.release(cand)

    def report(self, request: "Request") -> dict[str, Any]:
        return self._report


def mean_logprob(seq) -> float:
    if not seq.logprobs:
        return float("-inf")
    return sum(lp.logprob for lp in seq.logprobs) / len(seq.logprobs)


def strip_padding(token_ids: list[int], pad_token_id: int | None) -> list[int]:
    """Drop trailing pad tokens: HF sequence classifiers read the last non-pad position."""
    end = len(token_ids)
    while pad_token_id is not None and end > 1 and token_ids[end - 1] == pad_token_id:
        end -= 1
    return token_ids[:end]


def rank(scores: list[float]) -> list[int]:
    """Candidate indices best first; ties go to the lower index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def kl_bound(n: int) -> float:
    """Upper bound on KL(best-of-n || policy): log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def report(candidates: list, scores: list[float], order: list[int], n: int,
           reward_model: str | None) -> dict[str, Any]:
    key = "reward" if reward_model else "mean_logprob"
    return {"n": len(candidates), "scorer": reward_model or "mean_logprob", "chosen": order[:n],
            "kl_bound": kl_bound(len(candidates)),
            "candidates": [{"index": i, key: s, "text": c.output_text, "finish_reason": c.finish_reason,
                            "num_tokens": c.num_output_tokens} for i, (c, s) in enumerate(zip(candidates, scores))]}
