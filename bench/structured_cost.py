"""`python -m bench.structured_cost`: what a JSON schema costs in generation, and xgrammar
vs llguidance as the grammar engine on our vocabulary.

1. HTTP: our server with the default model is started here; the same chat requests are
   streamed with and without `response_format` json_schema at each concurrency (closed
   loop, `--requests` per level, plain and schema levels interleaved so a neighbour's load
   hits both alike). Output tokens/s = completion tokens (from usage) / wall time of the
   level. The schema is a list of 12 objects, longer than `--max-tokens`, so schema replies
   run to the limit as the plain ones do (those set `ignore_eos`): same lengths, same work,
   the mask the only difference. The first request of each kind (grammar compile, warm-up)
   is not timed.
2. Grammar engines (in process, no server; needs `pip install llguidance`, which the
   project does not depend on): per schema, the compile time (xgrammar: a cold
   `compile_json_schema`; llguidance: grammar text + matcher + first mask, as it compiles
   lazily) and the time to fill one packed int32 bitmask per token along a valid reply,
   with the tokenizer info our server builds (server/methods/structured.py). Both fill the
   same [ceil(vocab / 32)] layout our sampler applies (server/engine/constraints.py), so
   the apply step is the same for either; steps whose masks agree are counted.

Writes JSON (with the command and the machine) and a PNG beside it.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import cpu_snapshot, cpu_usage, machine_info
from bench.plots import replot_if_asked, results_parser

REPO = Path(__file__).resolve().parent.parent
ITEM = {"type": "object", "required": ["name", "qty"], "properties": {
    "name": {"type": "string", "minLength": 3, "maxLength": 12}, "qty": {"type": "integer", "minimum": 1, "maximum": 999}}}
LONG = {"type": "object", "required": ["items"], "properties": {
    "items": {"type": "array", "items": ITEM, "minItems": 12, "maxItems": 12}}}
ASK = [{"role": "user", "content": "List twelve things to buy at the market, with quantities, as JSON."}]
# (name, schema, a valid instance) for the engine comparison.
SCHEMAS = [
    ("person", {"type": "object", "required": ["name", "age"], "properties": {
        "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"}}},
     {"name": "Ada Lovelace", "age": 36, "email": "ada@math.com"}),
    ("enums+numbers", {"type": "object", "required": ["color", "price", "tags"], "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "price": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"enum": ["new", "sale", "eco"]}, "maxItems": 3}}},
     {"color": "green", "price": 12.5, "tags": ["sale", "eco"]}),
    ("nested+refs", {"$defs": {"point": {"type": "object", "required": ["x", "y"], "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}}}, "type": "object", "required": ["a", "b", "label"],
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"},
                       "label": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]}}},
     {"a": {"x": 1, "y": -2}, "b": {"x": 30, "y": 4}, "label": None}),
    ("list-of-12", LONG, {"items": [{"name": f"thing{i}", "qty": 10 * i + 1} for i in range(12)]}),
]


def percentiles_us(samples: list[float]) -> dict[str, float]:
    us = np.array(samples) * 1e6
    return {"n": len(us), "mean_us": float(us.mean()), "p50_us": float(np.percentile(us, 50)),
            "p99_us": float(np.percentile(us, 99))}


# ---- 2. grammar engines ----------------------------------------------------------------

def grammar_engines(model_dir: Path, repeats: int) -> list[dict[str, Any]]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt
    import torch
    import xgrammar as xgr
    from transformers import AutoConfig, AutoTokenizer

    from server.methods.structured import Grammars

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    grammars = Grammars(hf, vocab, [hf.eos_token_id])
    info = grammars._tokenizer_info(for_json=True)  # what the server's JSON compiler sees
    t = time.perf_counter()
    ll_tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    ll_tok_s = time.perf_counter() - t
    words = (vocab + 31) // 32
    out = []
    for name, schema, instance in SCHEMAS:
        text = json.dumps(instance, separators=(", ", ": "))
        ids = hf.encode(text, add_special_tokens=False) + [hf.eos_token_id]
        row: dict[str, Any] = {"schema": name, "reply_tokens": len(ids)}
        # xgrammar: a fresh compiler each repeat (its cache would make later compiles free).
        compiles, fills = [], []
        for _ in range(repeats):
            compiler = xgr.GrammarCompiler(info, max_threads=1)
            t = time.perf_counter()
            compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
            compiles.append(time.perf_counter() - t)
            m, mask = xgr.GrammarMatcher(compiled), torch.empty(words, dtype=torch.int32)
            x_masks = []
            for tok in ids:
                t = time.perf_counter()
                m.fill_next_token_bitmask(mask)
                fills.append(time.perf_counter() - t)
                x_masks.append(mask.clone())
                assert m.accept_token(tok), f"xgrammar rejected the reply of {name}"
        row["xgrammar"] = {"compile_ms": 1e3 * statistics.median(compiles), "mask": percentiles_us(fills)}
        # llguidance: grammar text and matcher are cheap, the first mask does the lazy work.
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        compiles, fills, agree = [], [], 0
        for _ in range(repeats):
            bitmask = llt.allocate_token_bitmask(1, vocab)
            t = time.perf_counter()
            m = llguidance.LLMatcher(ll_tok, grammar)
            llt.fill_next_token_bitmask(m, bitmask, 0)
            compiles.append(time.perf_counter() - t)
            for k, tok in enumerate(ids):
                if k:
                    t = time.perf_counter()
                    llt.fill_next_token_bitmask(m, bitmask, 0)
                    fills.append(time.perf_counter() - t)
                agree += bool(torch.equal(bitmask[0, :words], x_masks[k]))
                assert m.consume_token(tok), f"llguidance rejected the reply of {name}: {m.get_error()}"
        row["llguidance"] = {"compile_ms": 1e3 * statistics.median(compiles), "mask": percentiles_us(fills),
                             "error": m.get_error() or None}
        row["steps_with_equal_masks"] = agree / (repeats * len(ids))
        out.append(row)
        print(json.dumps(row), flush=True)
    return [{"llguidance_tokenizer_s": ll_tok_s, "vocab": vocab}] + out


# ---- 1. HTTP ---------------------------------------------------------------------------

async def _level(base_url: str, schema: bool, concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    import httpx

    from bench.client import RequestSpec, send_request
    from bench.tokens import TokenCounter

    body: dict[str, Any] = {"messages": ASK, "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "list", "schema": LONG}}
    else:
        body["ignore_eos"] = True
    records, counter, next_index = [], TokenCounter(None), iter(range(requests))
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        start = time.perf_counter()

        async def worker() -> None:
            for i in next_index:
                spec = RequestSpec(f"{base_url}/v1/chat/completions", {**body, "seed": i}, {}, ASK[0]["content"], 20, i)
                record, _ = await send_request(client, spec, 600, counter, start)
                records.append(record)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    good = [r for r in records if r.ok]
    tokens = sum(r.output_tokens for r in good)
    tpots = [r.tpot for r in good if r.tpot is not None]
    return {"schema": schema, "concurrency": concurrency, "requests": requests, "ok": len(good),
            "errors": sorted({r.error for r in records if r.error}), "output_tokens": tokens,
            "mean_output_tokens": tokens / max(len(good), 1), "wall_s": wall, "output_tok_s": tokens / wall,
            "tpot_p50_ms": 1e3 * float(np.median(tpots)) if tpots else None}


def http_levels(concurrency: list[int], requests: int, max_tokens: int) -> list[dict[str, Any]]:
    from bench.peer_specs import alignserve_spec
    from bench.peer_runs import free_port, stop, wait_ready

    port = free_port()
    spec = alignserve_spec(port)
    proc = subprocess.Popen([*spec.start, "--log-level", "warning"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    out = []
    try:
        wait_ready(proc, port, spec)
        for schema in (False, True):  # warm-up: compiles the grammar, fills caches
            asyncio.run(_level(base, schema, 1, 1, 8))
        for c in concurrency:
            for schema in (False, True):
                before = cpu_snapshot(proc.pid)
                row = asyncio.run(_level(base, schema, c, requests, max_tokens))
                row["cpu"] = cpu_usage(before, cpu_snapshot(proc.pid))
                out.append(row)
                print(json.dumps(row), flush=True)
    finally:
        stop(proc)
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    levels = doc.get("http") or []
    cs = sorted({r["concurrency"] for r in levels})
    x = np.arange(len(cs))
    for k, schema in enumerate((False, True)):
        vals = [next(r["output_tok_s"] for r in levels if r["concurrency"] == c and r["schema"] == schema) for c in cs]
        axes[0].bar(x + (k - 0.5) * 0.38, vals, 0.38, label="json_schema" if schema else "free text")
    axes[0].set_xticks(x, [f"{c} stream{'s' if c > 1 else ''}" for c in cs])
    axes[0].set_ylabel("output tokens/s (all streams)")
    axes[0].set_title("one server, default model: with and without a JSON schema", fontsize=9)
    axes[0].legend(fontsize=8)
    rows = [r for r in doc["grammar_engines"] if "schema" in r]
    x = np.arange(len(rows))
    for k, engine in enumerate(("xgrammar", "llguidance")):
        vals = [r[engine]["mask"]["mean_us"] for r in rows]
        bars = axes[1].bar(x + (k - 0.5) * 0.38, vals, 0.38, label=f"{engine} (label: compile ms)")
        for b, r in zip(bars, rows):
            axes[1].annotate(f"{r[engine]['compile_ms']:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                             ha="center", va="bottom", fontsize=7)
    axes[1].set_xticks(x, [r["schema"] for r in rows], fontsize=8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("µs per token mask (mean)")
    axes[1].set_title(f"grammar engines on our vocabulary ({doc['grammar_engines'][0]['vocab']} tokens)", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = results_parser(__doc__.splitlines()[0], REPO / "bench" / "results" / "structured_cost.json")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--requests", type=int, default=16, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="engine comparison: runs per schema")
    parser.add_argument("--skip-http", action="store_true", help="only compare the grammar engines")
    args = parser.parse_args(argv)
    if replot_if_asked(args, plot):
        return
    from server.models.default_model import ensure_default_model

    argv_used = argv if argv is not None else sys.argv[1:]
    doc: dict[str, Any] = {"command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "bench.structured_cost",
                                                                        *argv_used]),
                           "machine": machine_info(), "max_tokens": args.max_tokens,
                           # the server inherits these (a shared machine runs it on one thread)
                           "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS",) if k in os.environ}}
    doc["grammar_engines"] = grammar_engines(ensure_default_model(), args.repeats)
    if not args.skip_http:
        doc["http"] = http_levels([int(c) for c in args.concurrency.split(",")], args.requests, args.max_tokens)
        for c in sorted({r["concurrency"] for r in doc["http"]}):
            plain, schema = (next(r for r in doc["http"] if r["concurrency"] == c and r["schema"] == s)
                             for s in (False, True))
            doc.setdefault("slowdown", {})[str(c)] = 1 - schema["output_tok_s"] / plain["output_tok_s"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1))
    plot(doc, args.output.with_suffix(".png"))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
