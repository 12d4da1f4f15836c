"""`python -m bench.step_profile`: where a decode step's milliseconds go, at batch 1 and 16.

Runs the engine in-process behind its AsyncEngine (so streaming to asyncio consumers is
counted too): B requests of `--input-len` random tokens, greedy, `--max-tokens` each, all
admitted at once. After every prompt is prefilled it resets the engine's StepProfiler and
reads schedule / prepare / model / sample / output / stream per step over the decode steps
that follow. Writes bench/results/step_profile_<label>.{json,png} with the command and the
machine (CPU model and ISA flags), so a before/after pair is two runs with two labels.
`--adapters K` registers K random rank-8 adapters on every projection and spreads them over
the requests (request i uses adapter i mod K), for the multi-LoRA step.
"""
from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from bench.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)


def _random_adapters(engine, count: int, rank: int) -> list[str]:
    """Register `count` random rank-`rank` adapters on every projection (as bench.lora_throughput's
    PEFT files target all linear layers); their names, request i using name i % count."""
    from tests.adapters.helpers import fake_weights

    names = [f"random-{i}" for i in range(count)]
    for seed, name in enumerate(names):
        # Unit-variance A and B: a scaling of 0.005 keeps the deltas near the base's size.
        engine.add_adapter(name, fake_weights(engine.model_config, name, rank=rank, seed=seed, scaling=0.005))
    return names


async def _profile_batch(aeng, batch: int, input_len: int, max_tokens: int, seed: int,
                         adapters: list[str]) -> dict:
    from server.engine.sequence import SamplingParams

    engine = aeng.engine
    rng = random.Random(seed + batch)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    started = 0

    async def one(prompt: list[int], adapter: str | None) -> int:
        nonlocal started
        n = 0
        async for deltas in aeng.generate(prompt, params, adapter=adapter):
            was_started = n > 0
            n += sum(len(d.new_token_ids) for d in deltas)
            if n and not was_started:
                started += 1
                if started == batch:
                    # Every request is past its prefill: from here on, steps are decode only.
                    await aeng.call(lambda e: e.profiler.reset())
        return n

    prompts = [[rng.randrange(100, vocab) for _ in range(input_len)] for _ in range(batch)]
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(p, adapters[i % len(adapters)] if adapters else None)
                                    for i, p in enumerate(prompts)))
    wall = time.perf_counter() - t0
    prof = engine.profiler
    per_step = prof.per_step_ms()
    rows_per_step = prof.num_rows / max(1, prof.num_steps)
    return {"batch": batch, "decode_steps": prof.num_steps, "mean_rows": rows_per_step,
            "ms_per_step": per_step, "total_ms_per_step": sum(per_step.values()),
            "decode_tokens_per_s": 1000.0 * rows_per_step / max(1e-9, sum(per_step.values())),
            "output_tokens": sum(counts), "wall_s": wall}


def _plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottoms = [0.0] * len(runs)
    labels = [f"batch {r['batch']}" for r in runs]
    for phase in runs[0]["ms_per_step"]:
        vals = [r["ms_per_step"][phase] for r in runs]
        ax.bar(labels, vals, bottom=bottoms, label=phase)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"{doc['label']}: {doc['dtype']}, quantization {doc['quantization']} on {doc['machine']['cpu']}",
                 fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@app.command()
def main(
    label: Annotated[str, typer.Option(help="Name of this run (file suffix), e.g. before/after.")] = "after",
    batches: Annotated[str, typer.Option(help="Comma list of batch sizes.")] = "1,16",
    input_len: Annotated[int, typer.Option(help="Prompt tokens.")] = 128,
    max_tokens: Annotated[int, typer.Option(help="Tokens per request.")] = 64,
    dtype: Annotated[str, typer.Option(help="auto|float32|bfloat16.")] = "auto",
    quantization: Annotated[str, typer.Option(help="none|int8|int4.")] = "none",
    decode_stack: Annotated[bool, typer.Option(help="Decode steps' layers in one C++ call (the server's "
                                                    "default); --no-decode-stack: the Python layers.")] = True,
    adapters: Annotated[int, typer.Option(help="Distinct random rank-8 all-linear LoRA adapters among the "
                                               "batch's requests (request i uses adapter i mod K); 0: none.")] = 0,
    out_dir: Annotated[Path, typer.Option(help="Where the JSON/PNG go.")] = ROOT / "bench" / "results",
) -> None:
    """Profile decode steps phase by phase."""
    from server.api.lifecycle import freeze_startup_heap
    from server.config import EngineConfig, LoRAConfig
    from server.engine.async_engine import AsyncEngine, build_off_main_thread
    from server.engine.engine import LLMEngine

    # Built as `alignserve serve` builds it (see build_off_main_thread), so the steps measured
    # here run with the thread placement the server's engine loop has.
    engine = build_off_main_thread(lambda: LLMEngine(EngineConfig(model="", dtype=dtype, quantization=quantization,
                                                                       decode_stack=decode_stack,
                                                                       lora=LoRAConfig(max_loras=max(8, adapters)))))
    names = build_off_main_thread(lambda: _random_adapters(engine, adapters, rank=8))
    aeng = AsyncEngine(engine)
    freeze_startup_heap()  # as `alignserve serve` does before serving
    runs = []
    try:
        for batch in (int(b) for b in batches.split(",")):
            run = asyncio.run(_profile_batch(aeng, batch, input_len, max_tokens, seed=0, adapters=names))
            runs.append(run)
            typer.echo(f"batch {batch}: {run['total_ms_per_step']:.1f} ms/step "
                       + " ".join(f"{k}={v:.1f}" for k, v in run["ms_per_step"].items()))
    finally:
        aeng.shutdown()
    doc = {"tool": "bench.step_profile", "label": label,
           "command": " ".join(["python -m bench.step_profile", *sys.argv[1:]]),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
           "dtype": str(engine.dtype), "quantization": quantization, "linears": engine.linears,
           "input_len": input_len, "max_tokens": max_tokens, "adapters": adapters, "runs": runs}
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"step_profile_{label}.json"
    json_path.write_text(json.dumps(doc, indent=1))
    _plot(doc, out_dir / f"step_profile_{label}.png")
    typer.echo(f"wrote {json_path}")


if __name__ == "__main__":
    app()
