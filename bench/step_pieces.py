"""`python -m bench.step_pieces`: where the bare model step's milliseconds go, call by call.

Wall-clock timers wrap each projection, the LM head, attention and the fused elementwise ops
(kernels.fused) of a real `CausalLM` step: B sequences of `--context` tokens each decode one
token, or with `--prefill` each feed all `--context` tokens of a fresh prompt (logits for the
last row of each, as the runner does), built and run off the main thread as `alignserve serve`
runs it. Why
not torch's profiler: it inflates small ops several-fold (kernels/NOTES.md). Writes
bench/results/step_pieces_<label>.{json,png} with the command and the machine.
"""
from __future__ import annotations

import collections
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from bench.machine import machine_info
from bench.thread_placement import _in_thread, _step_inputs

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)


def _timed(totals: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        totals[key] += time.perf_counter() - t
        return out
    return wrapper


def _prefill_inputs(runner, batch: int, context: int):
    """B fresh prompts of `context` tokens each in one step (the runner's flat ragged batch)."""
    from kernels.paged_attention_cpu import plan_attention
    from server.models.llama import AttentionMetadata

    bs = runner.block_size
    blocks = -(-context // bs)
    tables = torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks) + 1
    lens, starts = [context] * batch, [b * context for b in range(batch + 1)]
    pos = torch.arange(context)
    slots = (tables.long()[:, pos // bs] * bs + pos % bs).reshape(-1)
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=torch.tensor(lens, dtype=torch.int32),
                             query_start_locs=torch.tensor(starts, dtype=torch.int32))
    meta.cpu_plan = plan_attention(tables, lens, starts, bs)
    last_rows = torch.tensor(starts[1:]) - 1
    return torch.randint(100, 1000, (batch * context,)), pos.repeat(batch), meta, last_rows


def _instrument(model, totals: dict) -> None:
    import server.models.llama as llama
    from kernels import fused

    for layer in model.layers:
        for module, key in ((layer.attention.wqkv, "wqkv"), (layer.attention.wo, "wo"),
                            (layer.mlp.w13, "w13"), (layer.mlp.w2, "w2")):
            module.forward = _timed(totals, key, module.forward)
    model.lm_head.forward = _timed(totals, "lm_head", model.lm_head.forward)
    for name, key in (("rms_norm", "rms_norm"), ("silu_and_mul", "silu_and_mul"), ("rotary_and_cache", "rotary+cache")):
        setattr(fused, name, _timed(totals, key, getattr(fused, name)))
    llama.dispatch.paged_attention = _timed(totals, "attention", llama.dispatch.paged_attention)


@app.command()
def main(
    label: Annotated[str, typer.Option(help="Name of this run (file suffix).")] = "now",
    batches: Annotated[str, typer.Option(help="Comma list of batch sizes.")] = "1,16,64",
    context: Annotated[int, typer.Option(help="Tokens of context per sequence.")] = 160,
    steps: Annotated[int, typer.Option(help="Timed steps per batch size.")] = 20,
    dtype: Annotated[str, typer.Option(help="auto|float32|bfloat16.")] = "auto",
    quantization: Annotated[str, typer.Option(help="none|int8|int4.")] = "none",
    prefill: Annotated[bool, typer.Option(help="Each sequence prefills its --context tokens.")] = False,
    out_dir: Annotated[Path, typer.Option(help="Where the JSON/PNG go.")] = ROOT / "bench" / "results",
) -> None:
    """Time each piece of the bare model step."""
    from server.config import EngineConfig
    from server.engine.async_engine import build_off_main_thread
    from server.engine.engine import LLMEngine

    engine = build_off_main_thread(lambda: LLMEngine(EngineConfig(model="", dtype=dtype, quantization=quantization)))
    runner, totals = engine.runner, collections.defaultdict(float)
    _instrument(runner.model, totals)

    def step(ids, pos, meta, last_rows):
        hidden = runner.model(ids, pos, runner.kv_caches, meta)[0]
        runner.model.compute_logits(hidden if last_rows is None else hidden.index_select(0, last_rows))

    def measure(batch: int) -> dict:
        inputs = _prefill_inputs(runner, batch, context) if prefill else (*_step_inputs(runner, batch, context), None)
        with torch.inference_mode():
            for _ in range(3):
                step(*inputs)
            totals.clear()
            t = time.perf_counter()
            for _ in range(steps):
                step(*inputs)
            total = (time.perf_counter() - t) / steps * 1000.0
        pieces = {k: v / steps * 1000.0 for k, v in totals.items()}
        pieces["other"] = total - sum(pieces.values())
        return {"batch": batch, "ms_per_step": total, "pieces_ms": pieces}

    runs = []
    for batch in (int(b) for b in batches.split(",")):
        run = _in_thread(lambda: measure(batch))
        runs.append(run)
        typer.echo(f"batch {batch}: {run['ms_per_step']:.1f} ms/step "
                   + " ".join(f"{k}={v:.2f}" for k, v in run["pieces_ms"].items()))
    doc = {"tool": "bench.step_pieces", "label": label,
           "command": " ".join(["python -m bench.step_pieces", *sys.argv[1:]]),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(), "dtype": str(engine.dtype),
           "quantization": quantization, "context": context, "prefill": prefill, "steps": steps, "runs": runs}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"step_pieces_{label}.json").write_text(json.dumps(doc, indent=1))
    _plot(doc, out_dir / f"step_pieces_{label}.png")


def _plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    labels = [f"batch {r['batch']}" for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottoms = [0.0] * len(runs)
    for piece in runs[0]["pieces_ms"]:
        values = [r["pieces_ms"].get(piece, 0.0) for r in runs]
        ax.bar(labels, values, bottom=bottoms, label=piece)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel("ms per model step")
    kind = "prompts prefilled" if doc.get("prefill") else "contexts, decode"
    ax.set_title(f"{doc['label']}: {doc['dtype']}, {doc['context']}-token {kind}, {doc['machine']['cpu']}",
                 fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    app()
