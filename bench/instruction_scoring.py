"""Scoring for the verifiable-instruction quality suite (bench/instruction_quality.py).

Owns: the checker verdicts of each reply, the best-of-N arms derived from one set of candidates
(the RM's pick and the checker's oracle pick among the first N of the same 16), the RM's and the
ARM's pairwise accuracy on held-out candidate pairs, and the log-prob of a reply under any served
model (base: drift; ARM adapter: its reward), read from echoed prompt logprobs of
`/v1/completions` with `max_tokens: 0`. Pure functions over JSON rows, plus one async client.
"""
from __future__ import annotations

import asyncio
import itertools
import random
import statistics
from typing import Any

from bench.rain_quality import rate


def grade(rows: list[dict], records: list[dict]) -> None:
    """Checker verdict and constraint fraction of each reply (and of every best-of-N candidate), in place."""
    from adapters.train.constraints import check_all, score

    for row, rec in zip(rows, records, strict=True):
        row["constraints"] = rec["constraints"]
        row["passed"] = all(check_all(rec["constraints"], row["text"]))
        row["score"] = score(rec["constraints"], row["text"])
        for cand in ((row.get("alignment") or {}).get("best_of_n") or {}).get("candidates", []):
            cand["passed"] = all(check_all(rec["constraints"], cand["text"]))
            cand["score"] = score(rec["constraints"], cand["text"])


def best_of_first(rows: list[dict], n: int, oracle: bool) -> list[dict]:
    """Best-of-n replies from the first n candidates of each best-of-N row: the highest reward
    (first on ties, as the server picks), or with `oracle` the first that passes the checkers
    (else the highest checker score): the upper bound a perfect reward model would reach."""
    out = []
    for row in rows:
        cands = row["alignment"]["best_of_n"]["candidates"][:n]
        if len(cands) < n:
            raise ValueError(f"best-of-{n} asked of a row with {len(cands)} candidates")
        key = (lambda c: (c["passed"], c["score"])) if oracle else (lambda c: c["reward"])
        pick = max(range(n), key=lambda i: (key(cands[i]), -i))
        c = cands[pick]
        out.append({"prompt": row["prompt"], "text": c["text"], "passed": c["passed"], "score": c["score"],
                    "reward": c["reward"], "candidate": pick, "completion_tokens": sum(x["num_tokens"] for x in cands)})
    return out


def candidate_pairs(rows: list[dict], per_prompt: int) -> list[dict]:
    """Held-out pairs: among the first `per_prompt` candidates of each prompt, every two whose
    checker scores differ, better one first."""
    pairs = []
    for row in rows:
        cands = row["alignment"]["best_of_n"]["candidates"][:per_prompt]
        for a, b in itertools.combinations(cands, 2):
            if a["score"] != b["score"]:
                hi, lo = (a, b) if a["score"] > b["score"] else (b, a)
                pairs.append({"prompt": row["prompt"], "better": hi["text"], "worse": lo["text"],
                              "rm_better": hi["reward"], "rm_worse": lo["reward"]})
    return pairs


def pairwise_accuracy(pairs: list[dict], better: str, worse: str, seed: int = 0) -> dict[str, Any]:
    """Fraction of pairs where the better reply scores strictly higher (ties count wrong; pairs
    a score is missing for are left out). Pairs of one prompt share candidates, so the interval
    is also given as a bootstrap over prompts (`ci95_by_prompt`), not only Wilson's."""
    rows = [{"prompt": p["prompt"], "correct": p[better] > p[worse]} for p in pairs
            if p[better] is not None and p[worse] is not None]
    by_prompt: dict[str, list[bool]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], []).append(r["correct"])
    groups = list(by_prompt.values())
    ci = bootstrap_ci(groups, lambda pick: sum(map(sum, pick)) / sum(map(len, pick)), seed)
    return {**rate(rows, "correct"), "prompts": len(groups), "ci95_by_prompt": ci}


def bootstrap_ci(units: list, statistic: Any, seed: int, resamples: int = 2000) -> list[float] | None:
    """95 % percentile interval of `statistic` over `units` resampled with replacement (None if empty)."""
    if not units:
        return None
    rng = random.Random(seed)
    stats = sorted(statistic([units[rng.randrange(len(units))] for _ in units]) for _ in range(resamples))
    return [stats[int(0.025 * resamples)], stats[int(0.975 * resamples) - 1]]


def paired_difference(arm: list[dict], reference: list[dict], seed: int = 0) -> dict[str, Any]:
    """Pass rate of `arm` minus that of `reference` on the prompts both answered, with a paired
    bootstrap 95 % interval (prompts resampled) and the discordant counts."""
    ref = {r["prompt"]: r["passed"] for r in reference}
    both = [(bool(r["passed"]), bool(ref[r["prompt"]])) for r in arm if r["prompt"] in ref]
    n = len(both)
    diffs = [a - b for a, b in both]
    return {"n": n, "diff": sum(diffs) / n if n else None,
            "ci95": bootstrap_ci(diffs, lambda pick: sum(pick) / len(pick), seed),
            "only_arm": sum(a and not b for a, b in both), "only_reference": sum(b and not a for a, b in both)}


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Pass rate (Wilson 95 %), constraint fraction, reply length and drift of one arm."""
    scored = [r for r in rows if r.get("reply_tokens") and r.get("base_logprob") is not None]
    out = {"pass": rate(rows, "passed"), "constraint_fraction_mean": statistics.fmean(r["score"] for r in rows),
           "completion_tokens_mean": statistics.fmean(r["completion_tokens"] for r in rows)}
    if "reply_tokens" in rows[0]:
        out |= {"reply_tokens_mean": statistics.fmean(r["reply_tokens"] for r in rows),
                "base_logprob_per_token": (sum(r["base_logprob"] for r in scored) /
                                           sum(r["reply_tokens"] for r in scored)) if scored else None,
                "empty_replies": sum(not r["text"] for r in rows),
                "unaligned_replies": sum(r.get("base_logprob") is None and bool(r["text"]) for r in rows)}
    if "latency_s" in rows[0]:
        out["latency_p50_s"] = statistics.median(r["latency_s"] for r in rows)
    return out


def chat_prefix(tokenizer: Any, prompt: str) -> str:
    """The text the server renders before a reply to one user turn (the model's chat template)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def chat_continuation(tokenizer: Any, prompt: str, reply: str) -> str:
    """The reply as the rendered conversation has it after `chat_prefix`: with its end-of-turn
    tokens, which the ARM's trained reward includes (adapters/train/arm.py)."""
    prefix = chat_prefix(tokenizer, prompt)
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": reply}], tokenize=False)
    if not full.startswith(prefix):
        raise ValueError("the chat template renders the prompt differently with a reply after it")
    return full[len(prefix):]


async def reply_logprobs(base_url: str, model: str, prefixes: list[str], replies: list[str],
                         concurrency: int) -> list[tuple[float | None, int]]:
    """(summed log-prob, token count) of each reply after its rendered prompt under `model`:
    the echoed prompt tokens whose text offset lies at or past the prefix's end. Where a token
    spans the boundary (a reply that starts with whitespace can merge with the template's last
    newline) no token starts at the prefix's end: the log-prob is None and the row is counted
    as unaligned, not scored one token short."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", timeout=3600, max_retries=0)
    gate = asyncio.Semaphore(concurrency)

    async def one(prefix: str, reply: str) -> tuple[float, int]:
        if not reply:
            return 0.0, 0
        async with gate:
            r = await client.completions.create(model=model, prompt=prefix + reply, max_tokens=0, echo=True,
                                                logprobs=0, temperature=0.0)
        lp = r.choices[0].logprobs
        picked = [v for v, off in zip(lp.token_logprobs, lp.text_offset) if off >= len(prefix)]
        if len(prefix) not in lp.text_offset:
            return None, len(picked)
        if any(v is None for v in picked):
            raise RuntimeError("a reply token came back without a logprob")
        return float(sum(picked)), len(picked)

    try:
        return await asyncio.gather(*(one(p, r) for p, r in zip(prefixes, replies, strict=True)))
    finally:
        await client.close()
