"""Best-of-N: N candidates from one prefill (forked, decoded as one batch), each scored by
a reward-model adapter through the engine, the best n returned.

Scores: the RM's score head on [prompt, candidate] rendered as the RM was trained (chat:
the chat template over the conversation plus the assistant reply, no generation prompt;
completions: prompt ids + output ids), read at the last token that is not padding, as HF
sequence classifiers do. Without a reward model the score is the mean token log-prob
(OpenAI's legacy `best_of`). Ties go to the lower candidate index.
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.engine.async_engine import AsyncEngine
from server.engine.messages import TokenLogprob
from server.engine.sequence import SamplingParams


@dataclass
class Candidate:
    """One finished sample of a request."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def mean_logprob(self) -> float:
        if not self.logprobs:
            return float("-inf")
        return sum(lp.logprob for lp in self.logprobs) / len(self.logprobs)


async def sample_candidates(engine: AsyncEngine, prompt_token_ids: list[int], params: SamplingParams,
                            adapter: str | None, method: Any = None,
                            on_first: Callable[[], None] | None = None) -> tuple[list[Candidate], dict]:
    """Run one request to completion; its n sequences and the methods' alignment report."""
    candidates = [Candidate(i) for i in range(params.n)]
    alignment: dict = {}
    async for deltas in engine.generate(prompt_token_ids, params, adapter, method=method):
        if on_first is not None:
            on_first()
            on_first = None
        for d in deltas:
            c = candidates[d.index]
            c.text += d.text
            c.token_ids += d.new_token_ids
            if d.finish_reason:
                c.finish_reason = d.finish_reason
            if d.logprobs:
                c.logprobs.extend(d.logprobs)
            if d.extra and "alignment" in d.extra:
                alignment.update(d.extra["alignment"])
    return candidates, alignment


def strip_padding(token_ids: list[int], pad_token_id: int | None) -> list[int]:
    """Drop trailing pad tokens: HF sequence classifiers read the last non-pad position."""
    end = len(token_ids)
    while pad_token_id is not None and end > 1 and token_ids[end - 1] == pad_token_id:
        end -= 1
    return token_ids[:end]


async def score(engine: AsyncEngine, inputs: list[list[int]], reward_model: str) -> list[float]:
    """Reward of each token sequence (scored concurrently, so they share engine steps)."""
    results = await asyncio.gather(*(engine.score(ids, reward_model) for ids in inputs))
    return [r[0] for r in results]


def rank(scores: list[float]) -> list[int]:
    """Candidate indices best first; ties go to the lower index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def kl_bound(n: int) -> float:
    """Upper bound on KL(best-of-n || policy): log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def report(candidates: list[Candidate], scores: list[float], order: list[int], n: int,
           reward_model: str | None) -> dict[str, Any]:
    key = "reward" if reward_model else "mean_logprob"
    return {"n": len(candidates), "scorer": reward_model or "mean_logprob", "chosen": order[:n],
            "kl_bound": kl_bound(len(candidates)),
            "candidates": [{"index": c.index, key: s, "text": c.text, "finish_reason": c.finish_reason,
                            "num_tokens": len(c.token_ids)} for c, s in zip(candidates, scores)]}
