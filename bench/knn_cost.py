"""`python -m bench.knn_cost`: what kNN-LM costs.

1. Build throughput: the invented encyclopedia's documents through `retrieval.knn_build`
   (teacher-forced prefill with last-layer taps, exactly what `alignserve index knn-build`
   runs), in tokens/s, then the datastore write (fp16 keys + faiss index) timed apart.
2. Decode overhead per token vs datastore size (10k, 100k, 1M keys by default) for a flat L2
   index and IVF-PQ (nprobe 32, exact re-ranking from the stored keys, the serving default):
   the engine's decode step time with `knn_lm` minus the same step without it, at decode
   batch 1 and 8, with the faiss search alone timed beside it. Base and kNN runs alternate,
   `--repeats` times each, and the median is kept, so drifting machine load hits both sides.

NOTE: datastores beyond the real build are the real keys tiled with seeded Gaussian noise
(σ = `--noise` × each dimension's spread): a search's cost depends on the number of keys, the
dimension and the index type, not on what the keys mean, and prefilling 1M tokens here would
take most of an hour. Build throughput is from the real build only.
Runs in-process on the engine (no HTTP: what is measured is the method, not the server).
Writes JSON (with the command and the machine) and a PNG beside it.
"""
from __future__ import annotations

import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import machine_info
from bench.plots import replot_if_asked, results_parser

REPO = Path(__file__).resolve().parent.parent


def build_throughput(engine, docs: list[dict], context_window: int) -> tuple[dict, np.ndarray, np.ndarray]:
    from retrieval.knn_build import collect_keys

    texts = [d["text"] for d in docs]
    start = time.perf_counter()
    keys, values = collect_keys(engine, texts, context_window=context_window)
    seconds = time.perf_counter() - start
    return ({"documents": len(texts), "tokens": int(len(values)), "seconds": seconds,
             "tokens_per_s": len(values) / seconds, "context_window": context_window}, keys, values)


def synthetic_keys(keys: np.ndarray, values: np.ndarray, n: int, noise: float, seed: int):
    """`n` keys: the real ones, then tiled copies with seeded noise (see the module NOTE)."""
    rng = np.random.default_rng(seed)
    reps = -(-n // len(keys))
    out = np.tile(keys, (reps, 1))[:n]
    scale = (noise * keys.std(axis=0)).astype(np.float32)
    for start in range(len(keys), n, 100_000):  # in slabs: 1M x 576 noise at once is 2.3 GB more
        stop = min(n, start + 100_000)
        out[start:stop] += rng.standard_normal((stop - start, keys.shape[1]), dtype=np.float32) * scale
    return out, np.tile(values, reps)[:n]


def decode_step_ms(engine, prompts: list[list[int]], tokens: int, method_factory=None) -> float:
    """Median engine step time (ms) while every request of the batch is decoding."""
    from server.engine.sequence import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"cost-{time.monotonic_ns()}-{i}", ids, params,
                           method=method_factory() if method_factory else None)
    steps: list[float] = []
    while engine.has_unfinished:
        decoding = all(seq.num_output_tokens > 0 for r in engine.requests.values() for seq in r.sequences)
        full = len(engine.requests) == len(prompts)
        start = time.perf_counter()
        engine.step()
        if decoding and full:
            steps.append(time.perf_counter() - start)
    return statistics.median(steps) * 1e3


def search_ms(store, queries: np.ndarray, k: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        store.search(queries, k, exact=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(args) -> dict[str, Any]:
    from bench.encyclopedia import make_encyclopedia, split
    from retrieval.datastore import write_datastore
    from server.config import EngineConfig, SchedulerConfig
    from server.engine.engine import LLMEngine
    from server.methods.knn_lm import KNNLM, KNNLMOptions

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device="cpu", scheduler=SchedulerConfig(
        max_num_seqs=16, max_num_batched_tokens=4096, max_model_len=2048)))
    train, held_out = split(make_encyclopedia(args.seed), args.seed)
    build, keys, values = build_throughput(engine, train[:args.build_docs], args.context_window)
    print(f"build: {build['tokens']} tokens at {build['tokens_per_s']:.0f} tok/s", file=sys.stderr)
    prompts = [engine.tokenizer.encode(d["text"])[:args.prompt_tokens] for d in held_out[:max(args.batches)]]
    meta = {"model_fingerprint": "bench", "adapter": None, "adapter_fingerprint": None,
            "tokenizer_fingerprint": "bench", "num_documents": 0}
    rows, base_ms = [], {}
    for b in args.batches:  # the base step time, measured apart too, for the table
        base_ms[b] = statistics.median(decode_step_ms(engine, prompts[:b], args.tokens) for _ in range(args.repeats))
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            sized_keys, sized_values = synthetic_keys(keys, values, size, args.noise, args.seed)
            for index_type in args.index_types:
                start = time.perf_counter()
                store = write_datastore(Path(tmp), f"cost-{size}-{index_type}", sized_keys, sized_values, meta,
                                        index_type)
                write_s = time.perf_counter() - start
                options = KNNLMOptions(datastore=store.name, k=args.k)
                for b in args.batches:
                    plain, knn = [], []
                    for _ in range(args.repeats):
                        plain.append(decode_step_ms(engine, prompts[:b], args.tokens))
                        knn.append(decode_step_ms(engine, prompts[:b], args.tokens, lambda: KNNLM(options, store)))
                    queries = sized_keys[np.random.default_rng(b).choice(size, b, replace=False)]
                    row = {"num_keys": size, "index_type": index_type, "batch": b, "k": args.k,
                           "write_s": write_s, "step_ms_base": statistics.median(plain),
                           "step_ms_knn": statistics.median(knn), "search_ms": search_ms(store, queries, args.k, 5)}
                    row["overhead_ms_per_step"] = row["step_ms_knn"] - row["step_ms_base"]
                    row["overhead_ms_per_token"] = row["overhead_ms_per_step"] / b
                    row["relative_slowdown"] = row["step_ms_knn"] / row["step_ms_base"]
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
                del store
    return {"benchmark": "knn_cost", "command": "python -m bench.knn_cost " + shlex.join(sys.argv[1:]),
            "machine": machine_info(), "model": args.model, "dtype": str(engine.dtype).removeprefix("torch."),
            "tokens_per_request": args.tokens, "prompt_tokens": args.prompt_tokens, "noise": args.noise,
            "seed": args.seed, "repeats": args.repeats, "build": build,
            "base_step_ms": {str(b): v for b, v in base_ms.items()}, "rows": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    rows = result["rows"]
    for index_type in sorted({r["index_type"] for r in rows}):
        for b in sorted({r["batch"] for r in rows}):
            sel = sorted((r for r in rows if r["index_type"] == index_type and r["batch"] == b),
                         key=lambda r: r["num_keys"])
            label = f"{index_type}, batch {b}"
            axes[0].plot([r["num_keys"] for r in sel], [r["overhead_ms_per_token"] for r in sel], "o-", label=label)
            axes[1].plot([r["num_keys"] for r in sel], [r["relative_slowdown"] for r in sel], "o-", label=label)
    for ax, ylabel in zip(axes, ("kNN-LM overhead, ms per token", "decode step time, kNN / base")):
        ax.set_xscale("log")
        ax.set_xlabel("datastore keys")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].axhline(1.0, c="gray", lw=1)
    axes[0].legend(fontsize=8)
    build = result["build"]
    fig.suptitle(f"kNN-LM cost (k={rows[0]['k']}, {result['machine']['cpu'][:40]}); "
                 f"build {build['tokens_per_s']:.0f} tok/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = results_parser(__doc__.splitlines()[0], REPO / "bench/results/knn_cost.json")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--sizes", type=lambda s: [int(float(v)) for v in s.split(",")], default=[10_000, 100_000, 1_000_000])
    p.add_argument("--index-types", type=lambda s: s.split(","), default=["flat", "ivfpq"])
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8])
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--tokens", type=int, default=24, help="Decode tokens per request.")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--build-docs", type=int, default=200)
    p.add_argument("--context-window", type=int, default=512)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if replot_if_asked(args, plot):
        return
    result = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    plot(result, args.output.with_suffix(".png"))
    print(json.dumps({"output": str(args.output), "build_tokens_per_s": result["build"]["tokens_per_s"]}))


if __name__ == "__main__":
    main()
