"""On-policy preference pairs from any OpenAI-compatible server, labelled by the constraint checkers.

In: instruction records (`instructions.py` JSONL: prompt + constraints) and a server URL.
Out: `{prompt, chosen, rejected, ...}` rows for `train dpo|rm|arm`, and held-out pass rates.
Per prompt we sample N responses (one request with `n=N`, or N seeded single requests if the
server returns fewer), score each as the fraction of its constraints met, and keep
chosen = best, rejected = worst. Tie rule: among equal scores the response sampled *first* wins
either role; sampling order is random, so this adds no length or content bias. Prompts whose
responses all score the same, and empty responses, give no pair. Also the two helpers every
loop against a server needs: Wilson intervals for pass rates and hot-loading an adapter.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from adapters.train.constraints import check_all, score
from adapters.train.data import DataError, read_jsonl


@dataclass(frozen=True)
class SamplingConfig:
    """How to query the server."""

    server: str = "http://localhost:8000/v1"
    model: str | None = None  # None: the first id from /v1/models
    n: int = 8
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 256
    seed: int = 0
    concurrency: int = 8
    timeout_s: float = 300.0
    api_key: str = "EMPTY"


def load_instructions(path: str) -> list[dict[str, Any]]:
    """Read instruction records; each needs a non-empty 'prompt' and a 'constraints' list."""
    records, errors = [], []
    for lineno, row in read_jsonl(path):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            errors.append(f"line {lineno}: missing or empty 'prompt'")
        elif not isinstance(row.get("constraints"), list):
            errors.append(f"line {lineno}: missing 'constraints' list")
        else:
            records.append(row)
    if errors:
        raise DataError(f"{path}: {len(errors)} bad line(s):\n  " + "\n  ".join(errors[:20]))
    return records


def make_client(cfg: SamplingConfig, http_client: Any = None) -> Any:
    """An `openai.AsyncOpenAI` for `cfg.server` (pass `http_client` to reroute transport)."""
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=cfg.server, api_key=cfg.api_key, timeout=cfg.timeout_s,
                       http_client=http_client, max_retries=2)


@contextlib.asynccontextmanager
async def open_client(cfg: SamplingConfig, http_client: Any = None) -> AsyncIterator[Any]:
    """`make_client`, closed on exit when it made its own transport: closing after `asyncio.run`
    has closed the loop raises "Event loop is closed" from httpx's finalizer."""
    client = make_client(cfg, http_client)
    try:
        yield client
    finally:
        if http_client is None:
            await client.close()


async def resolve_model(client: Any, model: str | None) -> str:
    """`model` itself, or the first model the server lists."""
    if model:
        return model
    listed = await client.models.list()
    if not listed.data:
        raise RuntimeError("the server lists no models; pass --model")
    return listed.data[0].id


async def sample(client: Any, model: str, prompt: str, cfg: SamplingConfig, seed: int, n: int) -> list[str]:
    """`n` chat responses to one user prompt, in sampling order."""
    from openai import BadRequestError

    messages = [{"role": "user", "content": prompt}]
    common = dict(model=model, messages=messages, temperature=cfg.temperature, top_p=cfg.top_p,
                  max_tokens=cfg.max_tokens)
    if n > 1:
        try:
            out = await client.chat.completions.create(n=n, seed=seed, **common)
            if len(out.choices) == n:
                return [c.message.content or "" for c in sorted(out.choices, key=lambda c: c.index)]
        except BadRequestError:
            pass  # the server does not take n>1: fall back to one seeded request per sample
    texts = []
    for i in range(n):
        out = await client.chat.completions.create(n=1, seed=seed + i, **common)
        texts.append(out.choices[0].message.content or "")
    return texts


def pick_pair(responses: Sequence[str], constraints: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Best vs worst response by constraint score (ties: first sampled), or None if no contrast."""
    scored = [(score(constraints, r), i, r) for i, r in enumerate(responses) if r.strip()]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda s: (s[0], -s[1]))
    worst = min(scored, key=lambda s: (s[0], s[1]))
    if best[0] <= worst[0]:
        return None
    return {"chosen": best[2], "rejected": worst[2], "chosen_score": best[0], "rejected_score": worst[0],
            "scores": [score(constraints, r) for r in responses]}


async def map_bounded(records: Sequence[dict[str, Any]], fn: Any, concurrency: int, desc: str) -> list[Any]:
    """Run `fn(index, record)` over records with bounded concurrency; results in input order."""
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(records), desc=desc)

    async def one(i: int, rec: dict[str, Any]) -> Any:
        async with gate:
            result = await fn(i, rec)
        bar.update(1)
        return result

    try:
        return await asyncio.gather(*(one(i, r) for i, r in enumerate(records)))
    finally:
        bar.close()


async def build_preferences(records: Sequence[dict[str, Any]], cfg: SamplingConfig,
                            http_client: Any = None) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sample, score and pair; returns (rows, stats)."""
    if cfg.n < 2:
        raise ValueError(f"--n must be at least 2 to form pairs, got {cfg.n}")
    async with open_client(cfg, http_client) as client:
        model = await resolve_model(client, cfg.model)

        async def one(i: int, rec: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None]:
            responses = await sample(client, model, rec["prompt"], cfg, cfg.seed + 1000 * i, cfg.n)
            return responses, pick_pair(responses, rec["constraints"])

        results = await map_bounded(records, one, cfg.concurrency, "sampling preferences")
        rows = []
        for rec, (_, pair) in zip(records, results, strict=True):
            if pair is not None:
                rows.append({"id": rec.get("id"), "prompt": rec["prompt"], **pair,
                             "constraints": rec["constraints"]})
        all_scores = [score(rec["constraints"], r) for rec, (resps, _) in zip(records, results, strict=True)
                      for r in resps]
        passed = [all(check_all(rec["constraints"], r)) for rec, (resps, _) in zip(records, results, strict=True)
                  for r in resps]
        stats = {"prompts": len(records), "pairs": len(rows), "responses": len(all_scores),
                 "mean_score": sum(all_scores) / max(1, len(all_scores)),
                 "pass_rate": sum(passed) / max(1, len(passed)), "model": model}
        return rows, stats


async def evaluate_pass_rate(records: Sequence[dict[str, Any]], cfg: SamplingConfig,
                             http_client: Any = None) -> dict[str, Any]:
    """One response per prompt (use temperature 0 for greedy); fraction passing all constraints."""
    async with open_client(cfg, http_client) as client:
        model = await resolve_model(client, cfg.model)

        async def one(i: int, rec: dict[str, Any]) -> str:
            return (await sample(client, model, rec["prompt"], cfg, cfg.seed + i, 1))[0]

        responses = await map_bounded(records, one, cfg.concurrency, f"evaluating {model}")
        passed = [all(check_all(rec["constraints"], r)) for rec, r in zip(records, responses, strict=True)]
        scores = [score(rec["constraints"], r) for rec, r in zip(records, responses, strict=True)]
        return {"model": model, "n": len(records), "passed": sum(passed),
                "pass_rate": sum(passed) / max(1, len(passed)), "mean_score": sum(scores) / max(1, len(scores)),
                "responses": responses}


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for a binomial proportion (every pass rate the trainer and the
    benches report)."""
    if n == 0:
        return (0.0, 1.0)
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


class AdapterLoadError(RuntimeError):
    """The server refused to load an adapter (e.g. outside its --adapter-root)."""


def load_adapter(server: str, name: str, path: Any) -> None:
    """Hot-load a PEFT adapter into a running server (vLLM-compatible `/v1/load_lora_adapter`)."""
    import httpx

    r = httpx.post(server.rstrip("/") + "/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                   timeout=300)
    if r.status_code >= 400:
        raise AdapterLoadError(f"load_lora_adapter {name} failed ({r.status_code}): {r.text}")
