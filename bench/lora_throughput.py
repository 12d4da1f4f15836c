"""Multi-LoRA cost: output tokens/s at 16 concurrent streams with 0, 1, 4 and 16 distinct adapters.

Starts `alignserve serve` with 16 random rank-8 LoRA adapters (all linear layers, PEFT format)
loaded with --lora-modules, then drives 16 concurrent greedy streams where request i uses
adapter i mod k (k = 0 means the base model). Each level first makes its adapters resident
(untimed), so the numbers are steady-state throughput. The levels are interleaved over
`--rounds` in mirrored order (0 1 4 16, then 16 4 1 0; `bench.interleave.schedule`), since a
shared VM's speed drifts by more than the gaps measured; each round's prompts are its own
(no prefix-cache hits across rounds), and a level's rounds are pooled: its tokens over its
summed time. Each round also records the engine's steps and ms per step in each phase (from
/metrics), so a gap between levels shows where it lies. Writes JSON + PNG to bench/results/.

    python -m bench.lora_throughput --rounds 3 --output bench/results/lora_throughput_cpu.json
"""
from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
# NOTE: run as a file, Python puts bench/ first on sys.path, where bench/datasets.py would
# shadow HF `datasets`; the repo root goes there instead.
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)

from bench.config import Target  # noqa: E402
from bench.interleave import schedule  # noqa: E402
from bench.machine import machine_info  # noqa: E402
from bench.peer_runs import engine_counters, engine_split  # noqa: E402
from bench.plots import replot_if_asked, results_parser, save_bar_chart  # noqa: E402
from tests.adapters.real_lora import ALL_LINEAR, make_real_adapter  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402


async def drive(base_url: str, models: list[str], concurrency: int, requests_per_stream: int,
                max_tokens: int, prompt_tag: str = "") -> dict:
    """Closed loop: `concurrency` workers, each sending `requests_per_stream` streamed requests
    (prompts tagged with `prompt_tag`, so runs with different tags share no prompt)."""
    tokens = 0
    errors = 0

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        for j in range(requests_per_stream):
            body = {"model": models[(i + j) % len(models)], "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": f"Write about topic {prompt_tag}{i}-{j}."}]}
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    errors += 1
                    continue
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"usage": {' in line:
                        tokens += json.loads(line[6:])["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(i, client) for i in range(concurrency)))
        wall = time.perf_counter() - start
    return {"output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall, "errors": errors}


def main() -> None:
    parser = results_parser(__doc__.splitlines()[0], REPO / "bench/results/lora_throughput_cpu.json")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--adapter-counts", default="0,1,4,16")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved passes over the levels")
    parser.add_argument("--dtype", default="auto", help="the server's --dtype")
    parser.add_argument("--lora-dtype", default="auto", help="the server's --lora-dtype")
    args = parser.parse_args()
    if replot_if_asked(args, plot):
        return
    from server.models.default_model import DEFAULT_MODEL_NAME, ensure_default_model

    model_dir = ensure_default_model()
    counts = [int(c) for c in args.adapter_counts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = [f"lora{i}" for i in range(max(counts))]
        for i, name in enumerate(names):
            make_real_adapter(model_dir, root / name, ALL_LINEAR, 8, seed=i)
        modules = [f"{n}={root / n}" for n in names]
        srv = ServerProcess("--dtype", args.dtype, "--lora-dtype", args.lora_dtype,
                            "--max-loras", str(max(16, max(counts))), "--num-kv-blocks", "4096",
                            *[x for m in modules for x in ("--lora-modules", m)])
        target = Target("alignserve", srv.base_url + "/v1")
        try:
            asyncio.run(drive(srv.base_url, [DEFAULT_MODEL_NAME], 4, 1, 8))  # warm-up
            rounds = []
            for slot in schedule(tuple(counts), 1, args.rounds):
                k = slot.name
                models = names[:k] if k else [DEFAULT_MODEL_NAME]
                # Warm-up: make every adapter of the level resident, so slot loads are not timed.
                asyncio.run(drive(srv.base_url, models, len(models), 1, 2, prompt_tag="warm-"))
                before = engine_counters(target)
                result = asyncio.run(drive(srv.base_url, models, args.concurrency, args.requests_per_stream,
                                           args.max_tokens, prompt_tag=f"r{slot.round}-"))
                split = engine_split(before, engine_counters(target), result["wall_s"])
                rounds.append({"distinct_adapters": k, "round": slot.round, **result, "engine": split})
                print(f"round {slot.round}  adapters={k:2d}  {result['output_tokens_per_s']:.1f} tok/s  "
                      f"errors={result['errors']}  engine={split}")
        finally:
            srv.stop()
    doc = {"benchmark": "lora_throughput", "command": " ".join(sys.argv),
           "machine": machine_info(), "config": vars(args) | {"output": str(args.output)},
           "runs": pool_levels(rounds, counts), "rounds": rounds}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, args.output.with_suffix(".png"))


def pool_levels(rounds: list[dict], counts: list[int]) -> list[dict]:
    """Each level's rounds pooled (its tokens over its summed time); when level 0 (the base
    model) is among them, also each level's pooled ratio to base and its ratio in each round.

    Raises:
        ValueError: a level with no rounds.
    """
    levels = []
    for k in counts:
        mine = [r for r in rounds if r["distinct_adapters"] == k]
        if not mine:
            raise ValueError(f"no rounds for {k} adapters")
        tokens, wall = sum(r["output_tokens"] for r in mine), sum(r["wall_s"] for r in mine)
        levels.append({"distinct_adapters": k, "output_tokens": tokens, "wall_s": wall,
                       "output_tokens_per_s": tokens / wall, "errors": sum(r["errors"] for r in mine),
                       "rounds_tokens_per_s": [r["output_tokens_per_s"] for r in mine]})
    if 0 not in counts:
        return levels
    base = levels[counts.index(0)]["output_tokens_per_s"]
    base_in_round = {r["round"]: r["output_tokens_per_s"] for r in rounds if r["distinct_adapters"] == 0}
    for level in levels:
        mine = [r for r in rounds if r["distinct_adapters"] == level["distinct_adapters"]]
        level["relative_to_base"] = level["output_tokens_per_s"] / base
        level["rounds_relative_to_base"] = [r["output_tokens_per_s"] / base_in_round[r["round"]] for r in mine]
    return levels


def plot(doc: dict, path: Path) -> None:
    """Bar chart of output tokens/s per number of distinct adapters."""
    runs = doc["runs"]
    save_bar_chart(path, [str(r["distinct_adapters"]) for r in runs], [r["output_tokens_per_s"] for r in runs],
                   "output tokens / s", "alignserve multi-LoRA throughput\nCPU (2 cores), SmolLM2-135M, "
                   "rank-8 all-linear", xlabel="distinct adapters among 16 concurrent streams")


if __name__ == "__main__":
    main()
