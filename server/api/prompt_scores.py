"""Prompt scores in the wire formats: OpenAI's legacy `echo` (the prompt's tokens and logprobs
before the completion's, the first logprob null) and vLLM's `prompt_logprobs` (per prompt
token: null first, then `{token_id: {logprob, rank, decoded_token}}` for the actual token and
the top-k).
"""
from __future__ import annotations

from typing import Any

from server.engine.messages import TokenLogprob


def echo_logprobs(tokenizer, prompt_ids: list[int], scores: list[TokenLogprob | None]) -> dict[str, list]:
    """The prompt's part of a completion's `logprobs` object (offsets from 0)."""
    tokens = [tokenizer.token_str(t) for t in prompt_ids]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [None if s is None else s.logprob for s in scores],
            "top_logprobs": [None if s is None else {tokenizer.token_str(t): v for t, v in s.top} for s in scores],
            "text_offset": offsets}


def join_logprobs(prompt_part: dict[str, list], completion_part: dict[str, list] | None, prompt_chars: int):
    if completion_part is None:
        return prompt_part
    return {"tokens": prompt_part["tokens"] + completion_part["tokens"],
            "token_logprobs": prompt_part["token_logprobs"] + completion_part["token_logprobs"],
            "top_logprobs": prompt_part["top_logprobs"] + completion_part["top_logprobs"],
            "text_offset": prompt_part["text_offset"] + [o + prompt_chars for o in completion_part["text_offset"]]}


def vllm_prompt_logprobs(tokenizer, scores: list[TokenLogprob | None]) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = []
    for s in scores:
        if s is None:
            out.append(None)
            continue
        entry = {str(t): {"logprob": v, "rank": r, "decoded_token": tokenizer.token_str(t)}
                 for r, (t, v) in enumerate(s.top, 1)}
        entry[str(s.token_id)] = {"logprob": s.logprob, "rank": s.rank, "decoded_token": tokenizer.token_str(s.token_id)}
        out.append(entry)
    return out
