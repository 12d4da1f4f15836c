"""`python -m bench.quant_quality`: what bf16 and weight-only int8/int4 cost in quality.

For each mode (float32 as the reference, bf16, int8, int4) on the default model:
- greedy agreement with float32: over chat prompts, the share of float32's greedy tokens
  reproduced before the first divergence (and how many prompts match to the end);
- perplexity on held-out text: Python standard-library docstrings (text no adapter here was
  trained on, identical on every machine with the same Python), teacher-forced through our
  own decoder in windows of `--window` tokens.
Writes bench/results/quant_quality.json (with the command and the machine).
"""
from __future__ import annotations

import importlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from bench.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)
HELD_OUT_MODULES = ("json", "argparse", "collections", "functools", "itertools", "pathlib", "subprocess",
                    "logging", "unittest", "asyncio", "dataclasses", "typing", "decimal", "fractions")
MODES = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"),
         "int8": ("float32", "int8"), "int4": ("float32", "int4")}


def held_out_text() -> str:
    docs = []
    for name in HELD_OUT_MODULES:
        module = importlib.import_module(name)
        docs.append((module.__doc__ or "").strip())
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and callable(obj) and getattr(obj, "__module__", None) == name:
                docs.append((obj.__doc__ or "").strip())
    return "\n\n".join(d for d in docs if d)


@torch.inference_mode()
def perplexity(engine, token_ids: list[int], window: int) -> tuple[float, int]:
    """exp(mean NLL) of every token after the first of each window, through our decoder."""
    from kernels.paged_attention_cpu import plan_attention
    from server.models.llama import AttentionMetadata

    model, cfg = engine.runner.model, engine.model_config
    block_size = 16
    total_nll, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        ids = torch.tensor(token_ids[start:start + window])
        n = ids.shape[0]
        if n < 2:
            break
        num_blocks = -(-n // block_size)
        shape = (num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim)
        caches = [(torch.zeros(shape, dtype=engine.dtype), torch.zeros(shape, dtype=engine.dtype))
                  for _ in range(cfg.num_layers)]
        tables = torch.arange(1, num_blocks + 1, dtype=torch.int32)[None]
        meta = AttentionMetadata(slot_mapping=torch.arange(n) + block_size, block_tables=tables,
                                 seq_lens=torch.tensor([n], dtype=torch.int32),
                                 query_start_locs=torch.tensor([0, n], dtype=torch.int32))
        meta.cpu_plan = plan_attention(tables, [n], [0, n], block_size)
        hidden, _ = model(ids, torch.arange(n), caches, meta)
        logits = model.compute_logits(hidden).double()
        nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum")
        total_nll += float(nll)
        count += n - 1
    return math.exp(total_nll / count), count


def greedy(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from server.engine.sequence import SamplingParams

    outs: dict[str, list[int]] = {}
    for i, ids in enumerate(prompts):
        engine.add_request(f"q{i}", ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        outs[f"q{i}"] = []
    while engine.has_unfinished:
        for d in engine.step():
            outs[d.request_id].extend(d.new_token_ids)
    return [outs[f"q{i}"] for i in range(len(prompts))]


def agreement(ours: list[list[int]], ref: list[list[int]]) -> dict:
    kept, total, full = 0, 0, 0
    for a, b in zip(ours, ref):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        kept += n
        total += len(b)
        full += a == b
    return {"tokens_before_divergence": kept / max(1, total), "prompts_identical": full, "prompts": len(ref)}


@app.command()
def main(
    num_prompts: Annotated[int, typer.Option(help="Chat prompts for greedy agreement.")] = 32,
    max_tokens: Annotated[int, typer.Option(help="Greedy tokens per prompt.")] = 64,
    window: Annotated[int, typer.Option(help="Tokens per perplexity window.")] = 512,
    max_text_tokens: Annotated[int, typer.Option(help="Held-out tokens scored.")] = 8192,
    out: Annotated[Path, typer.Option(help="Where the JSON goes.")] = ROOT / "bench" / "results" / "quant_quality.json",
) -> None:
    from adapters.train.instructions import generate_instructions
    from server.config import CacheConfig, EngineConfig
    from server.engine.engine import LLMEngine

    results, reference = {}, None
    for mode, (dtype, quantization) in MODES.items():
        engine = LLMEngine(EngineConfig(model="", dtype=dtype, quantization=quantization,
                                        cache=CacheConfig(num_kv_blocks=2048)))
        tok = engine.tokenizer
        prompts = [tok.apply_chat_template([{"role": "user", "content": r.prompt}])
                   for r in generate_instructions(num_prompts, seed=0)]
        text_ids = tok.encode(held_out_text())[:max_text_tokens]
        t0 = time.perf_counter()
        outs = greedy(engine, prompts, max_tokens)
        ppl, scored = perplexity(engine, text_ids, window)
        results[mode] = {"dtype": str(engine.dtype), "quantization": quantization, "linears": engine.linears,
                         "perplexity": ppl, "scored_tokens": scored, "seconds": time.perf_counter() - t0}
        if reference is None:
            reference = outs
        results[mode]["greedy_vs_float32"] = agreement(outs, reference)
        typer.echo(f"{mode}: ppl {ppl:.3f} over {scored} tokens, greedy {results[mode]['greedy_vs_float32']}")
        del engine
    base = results["float32"]["perplexity"]
    for r in results.values():
        r["perplexity_change"] = r["perplexity"] / base - 1.0
    doc = {"tool": "bench.quant_quality", "command": " ".join(["python -m bench.quant_quality", *sys.argv[1:]]),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
           "held_out": {"source": "docstrings of " + ", ".join(HELD_OUT_MODULES), "python": sys.version.split()[0]},
           "num_prompts": num_prompts, "max_tokens": max_tokens, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    plot(doc, out.with_suffix(".png"))
    typer.echo(f"wrote {out}")


def plot(doc: dict, path: Path) -> None:
    """Perplexity change vs float32 per mode; each label carries its greedy agreement."""
    from bench.plots import save_bar_chart

    res = doc["results"]
    labels = [f"{m}\n{100 * r['greedy_vs_float32']['tokens_before_divergence']:.0f} % greedy" for m, r in res.items()]
    save_bar_chart(path, labels, [100 * r["perplexity_change"] for r in res.values()], "perplexity change vs float32 (%)",
                   f"held-out perplexity ({next(iter(res.values()))['scored_tokens']} tokens) and greedy tokens kept "
                   f"before the first divergence\n{doc['machine']['cpu']}", size=(6, 3.8))


if __name__ == "__main__":
    app()
