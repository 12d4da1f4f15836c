"""Perplexity of documents through an OpenAI-compatible `/v1/completions` API (echoed prompt logprobs).

    python -m bench.perplexity --url http://127.0.0.1:8000/v1 --file eval.jsonl \
        [--knn-lm '{"datastore": "x", "k": 64, "lambda": 0.25, "temperature": 1}'] [--window 256] [--out r.json]

Each request is `{"model", "prompt": text, "max_tokens": 0, "echo": true, "logprobs": 0,
"temperature": 0}` (plus `knn_lm`), read as `choices[0].logprobs.token_logprobs` (one float per
prompt token, null first; `usage.prompt_tokens` of them). Servers that reject that form are
asked vLLM's way, `"prompt_logprobs": 0` -> `choices[0].prompt_logprobs` (`--form` forces one).
Perplexity = exp(-sum logprob / N) over every scored token; the first token of each request has
no logprob and is not scored. Documents longer than about `--window` tokens are cut into word
chunks of window/1.5 words (we have no tokenizer here; at >1.5 tokens per word a chunk can
exceed the window: `requests_over_window` says so). The 95 % interval is a seeded bootstrap
over documents (a document's tokens are not independent; documents roughly are).
If the server returns `text_offset` and a document lists its `entities` (bench.encyclopedia),
tokens overlapping an entity name are also scored apart (`entity_tokens` / `other_tokens`).

Input: .jsonl (one `{"text", "id"?}` per line) or .txt (documents separated by blank lines).
`perplexity(base_url, docs, ...)` is the same as a function (bench.knn_quality uses it).
"""
from __future__ import annotations

import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import typer

FORMS = ("auto", "echo", "prompt_logprobs")
TOKENS_PER_WORD = 1.5  # English BPE runs ~1.3; invented names more (encyclopedia: ~1.8)


class PerplexityError(RuntimeError):
    """A request failed or its response had no usable prompt logprobs."""


def chunk_words(text: str, window: int, tokens_per_word: float = TOKENS_PER_WORD) -> list[str]:
    """The text, or consecutive word chunks of about window/tokens_per_word words.

    Chunks are slices of the original text, so newlines inside a chunk survive.
    """
    words = list(re.finditer(r"\S+", text))
    per = max(1, int(window / tokens_per_word))
    if len(words) <= per:
        return [text.strip()] if words else []
    return [text[words[i].start():words[min(i + per, len(words)) - 1].end()] for i in range(0, len(words), per)]


def load_docs(path: Path) -> list[dict]:
    """Documents with "id" and "text" from .jsonl or .txt (blank-line separated)."""
    path = Path(path)
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        docs = [json.loads(line) for line in raw.splitlines() if line.strip()]
        for i, d in enumerate(docs):
            if not isinstance(d, dict) or not isinstance(d.get("text"), str):
                raise ValueError(f"{path}:{i + 1}: each line must be an object with a string `text`")
            d.setdefault("id", f"{path.stem}-{i}")
        return docs
    return [{"id": f"{path.stem}-{i}", "text": t} for i, t in enumerate(re.split(r"\n\s*\n", raw)) if t.strip()]


def parse_response(body: dict, form: str = "echo") -> tuple[list[float], list[int] | None]:
    """(logprobs of prompt tokens 1..n-1, their text offsets or None) from one response body."""
    choice = (body.get("choices") or [{}])[0]
    n = (body.get("usage") or {}).get("prompt_tokens")
    if form == "echo":
        lp = choice.get("logprobs") or {}
        values = lp.get("token_logprobs")
        if not isinstance(values, list) or not values or (n is not None and len(values) < n):
            raise PerplexityError(f"no echoed prompt logprobs (token_logprobs={str(values)[:80]}, prompt_tokens={n})")
        n = len(values) if n is None else n  # any generated tokens come after the prompt's n
        offsets = lp.get("text_offset")
        offsets = offsets[1:n] if isinstance(offsets, list) and len(offsets) >= n else None
        return _floats(values[1:n]), offsets
    if form != "prompt_logprobs":
        raise ValueError(f"form must be echo or prompt_logprobs, not {form!r}")
    entries = choice.get("prompt_logprobs") or body.get("prompt_logprobs")
    if not isinstance(entries, list) or not entries:
        raise PerplexityError("no prompt_logprobs in the response")
    ids = choice.get("prompt_token_ids") or body.get("prompt_token_ids")
    out = []
    for i, entry in enumerate(entries[1:], start=1):
        if not isinstance(entry, dict) or not entry:
            raise PerplexityError(f"prompt_logprobs[{i}] is empty")
        out.append(_actual(entry, str(ids[i]) if ids is not None and i < len(ids) else None, i))
    return _floats(out), None


def _actual(entry: dict, token_id: str | None, i: int) -> float:
    """The prompt token's logprob in one vLLM `prompt_logprobs` entry.

    We ask for 0 top tokens, so a server returns the prompt token alone. An entry with more
    holds the top tokens as well, and servers differ in where they put the prompt token (its rank
    is its true rank, not the lowest in general): only its id (`prompt_token_ids`) tells it.
    """
    if token_id is not None and token_id in entry:
        picked = entry[token_id]
    elif len(entry) == 1:
        picked = next(iter(entry.values()))
    else:
        raise PerplexityError(f"prompt_logprobs[{i}] has {len(entry)} tokens and no prompt_token_ids to pick from")
    return picked["logprob"] if isinstance(picked, dict) else picked


def _floats(values: list) -> list[float]:
    if any(v is None for v in values):
        # Skipping would drop the hardest tokens silently; a server that does this is broken.
        raise PerplexityError("a prompt token after the first has a null logprob")
    return [float(v) for v in values]


def entity_mask(text: str, offsets: list[int], names: list[str]) -> list[bool]:
    """Per scored token: does its character span [offset_i, offset_i+1) overlap an entity name?"""
    spans = [(m.start(), m.end()) for name in names for m in re.finditer(rf"\b{re.escape(name)}\b", text)]
    ends = [*offsets[1:], len(text)]
    return [any(s < b and a < e for a, b in spans) for s, e in zip(offsets, ends)]


def bootstrap_ppl(nll: list[float], n: list[int], seed: int = 0, resamples: int = 1000) -> list[float] | None:
    """95 % percentile interval of exp(sum nll / sum n) over documents resampled with replacement."""
    import numpy as np

    nll_a, n_a = np.asarray(nll, float), np.asarray(n, float)
    if not len(nll_a) or n_a.sum() == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, len(nll_a), size=(resamples, len(nll_a)))
    ppl = np.exp(nll_a[idx].sum(1) / np.maximum(n_a[idx].sum(1), 1))
    return [float(np.percentile(ppl, 2.5)), float(np.percentile(ppl, 97.5))]


def paired_reduction(base: list[dict], other: list[dict], seed: int = 0, resamples: int = 1000,
                     key: str = "") -> dict[str, Any] | None:
    """1 - ppl_other / ppl_base with a paired bootstrap interval (the same documents resampled for
    both); `per_doc` lists of two `perplexity` results, `key` "" for all tokens or "entity_"."""
    import numpy as np

    theirs = {d["id"]: d for d in other}
    pairs = [(b, theirs[b["id"]]) for b in base if b["id"] in theirs and b.get(f"{key}n") is not None]
    if not pairs:
        return None
    bn, bl = (np.array([b[f"{key}{f}"] for b, _ in pairs], float) for f in ("n", "nll"))
    on, ol = (np.array([o[f"{key}{f}"] for _, o in pairs], float) for f in ("n", "nll"))
    if bn.sum() == 0 or on.sum() == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, len(pairs), size=(resamples, len(pairs)))
    red = 1 - np.exp(ol[idx].sum(1) / np.maximum(on[idx].sum(1), 1) - bl[idx].sum(1) / np.maximum(bn[idx].sum(1), 1))
    point = 1 - math.exp(ol.sum() / on.sum() - bl.sum() / bn.sum())
    return {"reduction": point, "ci95": [float(np.percentile(red, 2.5)), float(np.percentile(red, 97.5))],
            "n_docs": len(pairs)}


class _Scorer:
    """One HTTP client shared by the worker threads (httpx.Client is thread-safe)."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float, transport: Any = None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers, transport=transport)

    def model(self) -> str:
        r = self.http.get("/models")
        r.raise_for_status()
        data = r.json().get("data") or []
        roots = [m["id"] for m in data if not m.get("parent")]  # adapters list a parent
        if not data:
            raise PerplexityError("GET /models listed no model; pass --model")
        return roots[0] if roots else data[0]["id"]

    def score(self, model: str, text: str, knn_lm: dict | None, form: str) -> tuple[list[float], list[int] | None, int, dict | None]:
        """(logprobs, offsets, prompt tokens, `alignment` report) of one text; one retry on 5xx/transport errors."""
        import httpx

        body: dict[str, Any] = {"model": model, "prompt": text, "temperature": 0}
        if form == "echo":
            body.update(max_tokens=0, echo=True, logprobs=0)
        else:
            body.update(max_tokens=1, prompt_logprobs=0)  # vLLM wants at least one generated token
        if knn_lm is not None:
            body["knn_lm"] = knn_lm
        for attempt in (0, 1):
            try:
                r = self.http.post("/completions", json=body)
            except httpx.TransportError as exc:
                if attempt:
                    raise PerplexityError(f"{type(exc).__name__}: {exc}") from exc
                continue
            if r.status_code >= 500 and not attempt:
                continue
            if r.status_code != 200:
                raise PerplexityError(f"HTTP {r.status_code}: {r.text[:300]}")
            data = r.json()
            values, offsets = parse_response(data, form)
            return values, offsets, (data.get("usage") or {}).get("prompt_tokens") or len(values) + 1, data.get("alignment")
        raise AssertionError("unreachable")


def perplexity(base_url: str, docs: list[dict] | list[str], knn_lm: dict | None = None, *, model: str | None = None,
               window: int = 256, api_key: str | None = None, concurrency: int = 4, timeout: float = 300.0,
               seed: int = 0, resamples: int = 1000, form: str = "auto", transport: Any = None) -> dict[str, Any]:
    """Perplexity of `docs` (dicts with "text" [, "id", "entities"] or plain strings); see the module doc."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}")
    docs = [{"id": f"doc-{i}", "text": d} if isinstance(d, str) else {"id": f"doc-{i}", **d} for i, d in enumerate(docs)]
    started = time.perf_counter()
    scorer = _Scorer(base_url, api_key, timeout, transport)
    model = model or scorer.model()
    jobs = [(i, chunk) for i, d in enumerate(docs) for chunk in chunk_words(d["text"], window)]
    if not jobs:
        raise PerplexityError("no text to score")
    # The first request runs alone: it settles the response form before the pool starts.
    first = None
    for f in (("echo", "prompt_logprobs") if form == "auto" else (form,)):
        try:
            first = scorer.score(model, jobs[0][1], knn_lm, f)
            form = f
            break
        except PerplexityError as exc:
            error = exc
    if first is None:
        raise error
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        outs = [first, *pool.map(lambda job: scorer.score(model, job[1], knn_lm, form), jobs[1:])]
    per_doc = [{"id": d["id"], "nll": 0.0, "n": 0, "entity_nll": None, "entity_n": None} for d in docs]
    lengths = []
    for (i, chunk), (values, offsets, prompt_tokens, _) in zip(jobs, outs):
        row = per_doc[i]
        row["nll"] -= sum(values)
        row["n"] += len(values)
        lengths.append(prompt_tokens)
        names = docs[i].get("entities")
        if names and offsets is not None:
            mask = entity_mask(chunk, offsets, names)
            ent = [v for v, m in zip(values, mask) if m]
            row["entity_nll"] = (row["entity_nll"] or 0.0) - sum(ent)
            row["entity_n"] = (row["entity_n"] or 0) + len(ent)
    for row in per_doc:
        if row["entity_n"] is not None:
            row["other_nll"], row["other_n"] = row["nll"] - row["entity_nll"], row["n"] - row["entity_n"]
    result = _summary(per_doc, "", seed, resamples)
    result.update({
        "n_docs": len(docs), "n_requests": len(jobs), "model": model, "knn_lm": knn_lm, "form": form,
        "window": window, "max_prompt_tokens": max(lengths), "requests_over_window": sum(n > window for n in lengths),
        "bootstrap": {"unit": "document", "resamples": resamples, "seed": seed},
        "alignment_sample": first[3], "wall_s": round(time.perf_counter() - started, 2)})
    if any(r["entity_n"] is not None for r in per_doc):
        result["entity_tokens"] = _summary(per_doc, "entity_", seed, resamples)
        result["other_tokens"] = _summary(per_doc, "other_", seed, resamples)
    result["per_doc"] = per_doc
    return result


def _summary(per_doc: list[dict], key: str, seed: int, resamples: int) -> dict[str, Any]:
    rows = [r for r in per_doc if r.get(f"{key}n") is not None]
    nll, n = sum(r[f"{key}nll"] for r in rows), sum(r[f"{key}n"] for r in rows)
    return {"ppl": math.exp(nll / n) if n else None, "nll": nll, "n_tokens": n,
            "ci95": bootstrap_ppl([r[f"{key}nll"] for r in rows], [r[f"{key}n"] for r in rows], seed, resamples)}


def perplexity_cmd(
    url: Annotated[str, typer.Option(help="Base URL, e.g. http://127.0.0.1:8000/v1.")] = "http://127.0.0.1:8000/v1",
    file: Annotated[Path | None, typer.Option(help=".jsonl (one {text} per line) or .txt (blank-line separated).")] = None,
    knn_lm: Annotated[str | None, typer.Option(help='JSON, e.g. {"datastore": "x", "k": 64, "lambda": 0.25}.')] = None,
    window: Annotated[int, typer.Option(min=8, help="Tokens per request, roughly (word chunks of window/1.5).")] = 256,
    model: Annotated[str | None, typer.Option(help="Model name; default: first base model of GET /models.")] = None,
    api_key: Annotated[str | None, typer.Option(help="Sent as a Bearer token.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 4,
    form: Annotated[str, typer.Option(help="auto | echo | prompt_logprobs (vLLM).")] = "auto",
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    resamples: Annotated[int, typer.Option(min=10, help="Bootstrap resamples.")] = 1000,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 300.0,
    out: Annotated[Path | None, typer.Option(help="Write the result JSON (with per-document sums) here.")] = None,
) -> None:
    """Perplexity of a file's documents, from echoed prompt logprobs (optionally with kNN-LM)."""
    try:
        if file is None or not file.is_file():
            raise ValueError(f"--file {file}: no such file")
        options = json.loads(knn_lm) if knn_lm else None
        if options is not None and not isinstance(options, dict):
            raise ValueError("--knn-lm must be a JSON object")
        if form not in FORMS:
            raise ValueError(f"--form must be one of {', '.join(FORMS)}")
        docs = load_docs(file)
    except (ValueError, OSError) as exc:  # json.JSONDecodeError is a ValueError
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        res = perplexity(url, docs, options, model=model, window=window, api_key=api_key, concurrency=concurrency,
                         timeout=timeout, seed=seed, resamples=resamples, form=form)
    except Exception as exc:  # noqa: BLE001 - the server's fault: say it, exit 1
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from exc
    lo, hi = res["ci95"] or (float("nan"), float("nan"))
    typer.echo(f"ppl {res['ppl']:.4f} (95% {lo:.4f}-{hi:.4f}), N={res['n_tokens']} tokens, "
               f"{res['n_docs']} docs, {res['n_requests']} requests, form {res['form']}, {res['wall_s']} s")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"file": str(file), "url": url, **res}, indent=1))
        typer.echo(f"wrote {out}")


if __name__ == "__main__":
    typer.run(perplexity_cmd)
