"""`python -m bench.thread_placement`: one decode step of the bare model, run from the main thread
vs from a second Python thread (where the server's engine loop runs, server/engine/async_engine).

Same model, same inputs, same process: B sequences of `--context` tokens each decode one token
(`CausalLM` forward + LM head, planned CPU attention), `--steps` timed steps after a warm-up,
placements alternated `--rounds` times so that drift hits both. Writes
bench/results/thread_placement.{json,png} with the command and the machine.
"""
from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from bench.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)


def _step_inputs(runner, batch: int, context: int):
    from kernels.paged_attention_cpu import plan_attention
    from server.models.llama import AttentionMetadata

    bs = runner.block_size
    blocks = -(-context // bs)
    tables = (torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks) + 1)
    lens, starts = [context] * batch, list(range(batch + 1))
    slots = torch.tensor([int(tables[b, (context - 1) // bs]) * bs + (context - 1) % bs for b in range(batch)])
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=torch.tensor(lens, dtype=torch.int32),
                             query_start_locs=torch.tensor(starts, dtype=torch.int32))
    meta.cpu_plan = plan_attention(tables, lens, starts, bs)
    return torch.randint(100, 1000, (batch,)), torch.full((batch,), context - 1), meta


def _time_steps(runner, inputs, steps: int) -> float:
    ids, pos, meta = inputs
    with torch.inference_mode():
        for _ in range(3):
            runner.model.compute_logits(runner.model(ids, pos, runner.kv_caches, meta)[0])
        t = time.perf_counter()
        for _ in range(steps):
            runner.model.compute_logits(runner.model(ids, pos, runner.kv_caches, meta)[0])
    return (time.perf_counter() - t) / steps * 1000.0


def _in_thread(fn):
    out = {}
    worker = threading.Thread(target=lambda: out.update(ms=fn()))
    worker.start()
    worker.join()
    return out["ms"]


@app.command()
def main(
    batches: Annotated[str, typer.Option(help="Comma list of batch sizes.")] = "1,16",
    context: Annotated[int, typer.Option(help="Tokens of context per sequence.")] = 160,
    steps: Annotated[int, typer.Option(help="Timed steps per measurement.")] = 20,
    rounds: Annotated[int, typer.Option(help="Alternations of main / second thread.")] = 3,
    dtype: Annotated[str, typer.Option(help="auto|float32|bfloat16.")] = "auto",
    out_dir: Annotated[Path, typer.Option(help="Where the JSON/PNG go.")] = ROOT / "bench" / "results",
) -> None:
    """Time the model step from the main thread and from a second thread."""
    from server.config import EngineConfig
    from server.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model="", dtype=dtype))
    runs = []
    for batch in (int(b) for b in batches.split(",")):
        inputs = _step_inputs(engine.runner, batch, context)
        main_ms, thread_ms = [], []
        for _ in range(rounds):
            main_ms.append(_time_steps(engine.runner, inputs, steps))
            thread_ms.append(_in_thread(lambda: _time_steps(engine.runner, inputs, steps)))
        runs.append({"batch": batch, "main_thread_ms": main_ms, "second_thread_ms": thread_ms,
                     "median_main_ms": statistics.median(main_ms), "median_second_ms": statistics.median(thread_ms)})
        typer.echo(f"batch {batch}: main {statistics.median(main_ms):.1f} ms, second thread "
                   f"{statistics.median(thread_ms):.1f} ms per step")
    doc = {"tool": "bench.thread_placement", "command": " ".join(["python -m bench.thread_placement", *sys.argv[1:]]),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(), "dtype": str(engine.dtype),
           "torch_threads": torch.get_num_threads(), "context": context, "steps": steps, "runs": runs}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "thread_placement.json").write_text(json.dumps(doc, indent=1))
    _plot(doc, out_dir / "thread_placement.png")


def _plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"batch {r['batch']}" for r in doc["runs"]]
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([i - 0.2 for i in x], [r["median_main_ms"] for r in doc["runs"]], 0.4, label="main thread")
    ax.bar([i + 0.2 for i in x], [r["median_second_ms"] for r in doc["runs"]], 0.4, label="second thread")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("ms per decode step (median of rounds)")
    ax.set_title(f"model step by calling thread, {doc['dtype']} on {doc['machine']['cpu']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    app()
