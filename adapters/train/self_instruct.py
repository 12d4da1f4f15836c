"""Magpie-style instruction synthesis (arXiv 2406.08464) through an OpenAI-compatible server.

In: the served model's tokenizer (for its chat template) and a server URL. Out: SFT rows
`{"messages": [user, assistant]}`. Step 1 sends only the template's *pre-query prefix* (everything
before the first user message's text, e.g. `<|im_start|>system ...<|im_end|>\n<|im_start|>user\n`)
to the completions endpoint, stopping at the end-of-turn marker: an aligned model fills in a
plausible user request. Step 2 answers each kept request through the chat endpoint. Requests are
deduplicated (normalised text, then word-trigram Jaccard) and answers cut off by `max_tokens` are
dropped, since they would teach the model not to stop.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapters.train.preferences import SamplingConfig, map_bounded, open_client, resolve_model

_SENTINEL = "\u2402MAGPIE-QUERY\u2402"


@dataclass(frozen=True)
class MagpieConfig:
    """Sizes and filters for instruction synthesis."""

    n: int = 100
    instruction_temperature: float = 1.0
    instruction_max_tokens: int = 128
    answer_temperature: float = 0.7
    answer_max_tokens: int = 512
    min_words: int = 3
    max_words: int = 200
    jaccard_threshold: float = 0.7
    max_rounds: int = 5
    system_prompt: str | None = None


def pre_query_template(tokenizer: Any, system_prompt: str | None = None) -> tuple[str, str | None]:
    """(text before the user's words, end-of-turn stop string) from the chat template."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if text.count(_SENTINEL) != 1:
        raise ValueError("the chat template does not render the user message verbatim")
    prefix, suffix = text.split(_SENTINEL)
    stop = suffix.strip() or None
    return prefix, stop


def normalise(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: the exact-duplicate key."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _shingles(text: str) -> frozenset[tuple[str, ...]]:
    words = normalise(text).split()
    return frozenset(tuple(words[i:i + 3]) for i in range(max(1, len(words) - 2)))


def dedupe(texts: Sequence[str], threshold: float) -> list[str]:
    """Keep the first of each group of exact (normalised) or near (trigram Jaccard >= threshold) dupes."""
    kept: list[str] = []
    keys: set[str] = set()
    kept_shingles: list[frozenset[tuple[str, ...]]] = []
    for text in texts:
        key = normalise(text)
        if not key or key in keys:
            continue
        sh = _shingles(text)
        if any(len(sh & other) / len(sh | other) >= threshold for other in kept_shingles):
            continue
        keys.add(key)
        kept.append(text)
        kept_shingles.append(sh)
    return kept


def clean_instruction(text: str, cfg: MagpieConfig, markers: Sequence[str]) -> str | None:
    """The generated user turn, or None when empty, too short/long or leaking template markers."""
    text = text.strip()
    if not text or any(m and m in text for m in markers):
        return None
    n_words = len(text.split())
    return text if cfg.min_words <= n_words <= cfg.max_words else None


async def synthesize(tokenizer: Any, sampling: SamplingConfig, cfg: MagpieConfig,
                     http_client: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate up to `cfg.n` deduplicated (instruction, answer) pairs; returns (rows, stats)."""
    async with open_client(sampling, http_client) as client:
        model = await resolve_model(client, sampling.model)
        prefix, stop = pre_query_template(tokenizer, cfg.system_prompt)
        markers = [m for m in (stop, *getattr(tokenizer, "all_special_tokens", [])) if m]
        instructions: list[str] = []
        generated = 0
        for round_idx in range(cfg.max_rounds):
            missing = cfg.n - len(instructions)
            if missing <= 0:
                break
            batch = [{"i": round_idx * 100_000 + k} for k in range(missing)]

            async def one(i: int, rec: dict[str, Any]) -> str:
                out = await client.completions.create(
                    model=model, prompt=prefix, max_tokens=cfg.instruction_max_tokens,
                    temperature=cfg.instruction_temperature, top_p=1.0, seed=sampling.seed + rec["i"],
                    stop=[stop] if stop else None)
                return out.choices[0].text

            raw = await map_bounded(batch, one, sampling.concurrency, f"instructions (round {round_idx + 1})")
            generated += len(raw)
            cleaned = [c for c in (clean_instruction(t, cfg, markers) for t in raw) if c]
            instructions = dedupe(instructions + cleaned, cfg.jaccard_threshold)[:cfg.n]

        async def answer(i: int, rec: dict[str, Any]) -> tuple[str, str | None]:
            out = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": rec["instruction"]}],
                temperature=cfg.answer_temperature, max_tokens=cfg.answer_max_tokens, seed=sampling.seed + i)
            choice = out.choices[0]
            return choice.message.content or "", choice.finish_reason

        answers = await map_bounded([{"instruction": t} for t in instructions], answer, sampling.concurrency,
                                    "answers")
        rows = [{"messages": [{"role": "user", "content": ins}, {"role": "assistant", "content": ans.strip()}],
                 "source": "magpie", "model": model}
                for ins, (ans, finish) in zip(instructions, answers, strict=True)
                if ans.strip() and finish != "length"]
        stats = {"generated": generated, "unique_instructions": len(instructions), "rows": len(rows),
                 "model": model, "pre_query_prefix": prefix, "stop": stop}
        return rows, stats
