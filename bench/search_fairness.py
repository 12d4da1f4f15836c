"""Fairness of search requests: plain streams' TPOT beside 8 concurrent search requests.

Starts `alignserve serve` with a random reward model (LoRA + score head), then measures the
time per output token (TPOT, p50 over streams) of 8 plain streams alone, and again while 8
search requests (RAIN or block search, `--method`) run at the same time. A search's driver
decides between engine steps and its sequences share the plain streams' batches, so the
plain streams should slow by the extra batch rows only. Goal (issue 11): p50 TPOT beside the
searches within 2x of alone.

    python -m bench.search_fairness --method search --output bench/results/search_fairness_cpu.json
"""
from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":  # see bench/methods_latency.py
    sys.path[0] = str(REPO)

from bench.machine import machine_info  # noqa: E402
from bench.plots import replot_if_asked, results_parser, save_bar_chart  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402
from tests.methods.adapters import make_reward_adapter  # noqa: E402

SEARCH_OPTIONS = {
    "search": {"search": {"reward_model": "rm", "beam_width": 4, "block_tokens": 8, "max_blocks": 16}},
    "rain": {"rain": {"evaluator": "rm"}},
}


async def plain_stream(client: httpx.AsyncClient, i: int, max_tokens: int) -> float:
    """TPOT of one stream: (last token time - first token time) / (tokens - 1)."""
    body = {"messages": [{"role": "user", "content": f"Tell story number {i}."}], "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 1.0, "seed": i, "stream": True}
    stamps = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content": ""' not in line:
                stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)


async def search_request(client: httpx.AsyncClient, i: int, extra: dict, max_tokens: int) -> float:
    body = {"messages": [{"role": "user", "content": f"Give advice number {i}."}], "max_tokens": max_tokens,
            "temperature": 1.0, "seed": 100 + i, **extra}
    start = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - start


async def measure(base_url: str, extra: dict | None, streams: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=base_url, timeout=1800) as client:
        plain = [plain_stream(client, i, max_tokens) for i in range(streams)]
        searches = [search_request(client, i, extra, max_tokens) for i in range(streams)] if extra else []
        results = await asyncio.gather(*plain, *searches)
    tpot = results[:streams]
    return {"tpot_s": tpot, "tpot_p50_s": statistics.median(tpot), "search_latency_s": results[streams:]}


def main() -> None:
    parser = results_parser(__doc__.splitlines()[0], REPO / "bench/results/search_fairness_cpu.json")
    parser.add_argument("--method", choices=sorted(SEARCH_OPTIONS), default="search")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if replot_if_asked(args, plot):
        return
    from server.models.default_model import ensure_default_model

    with tempfile.TemporaryDirectory() as tmp:
        make_reward_adapter(ensure_default_model(), Path(tmp) / "rm", seed=2)
        srv = ServerProcess("--num-kv-blocks", "4096", "--lora-modules", f"rm={Path(tmp) / 'rm'}")
        try:
            asyncio.run(measure(srv.base_url, None, 2, 8))  # warm-up
            alone = asyncio.run(measure(srv.base_url, None, args.streams, args.max_tokens))
            beside = asyncio.run(measure(srv.base_url, SEARCH_OPTIONS[args.method], args.streams, args.max_tokens))
        finally:
            srv.stop()
    ratio = beside["tpot_p50_s"] / alone["tpot_p50_s"]
    print(f"TPOT p50 alone {alone['tpot_p50_s'] * 1e3:.1f} ms, beside {args.streams} {args.method}: "
          f"{beside['tpot_p50_s'] * 1e3:.1f} ms ({ratio:.2f}x; goal <= 2x)")
    command = " ".join(["python", "-m", "bench.search_fairness", *sys.argv[1:]])
    doc = {"benchmark": "search_fairness", "command": command,
           "machine": machine_info(),
           "config": {"method": args.method, "options": SEARCH_OPTIONS[args.method], "streams": args.streams,
                      "max_tokens": args.max_tokens},
           "alone": alone, "beside_search": beside, "tpot_ratio": ratio}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, args.output.with_suffix(".png"))


def plot(doc: dict, path: Path) -> None:
    cfg = doc["config"]
    save_bar_chart(path, ["plain alone", f"plain beside {cfg['streams']} {cfg['method']}"],
                   [1.0, doc["tpot_ratio"]], "plain TPOT p50 / alone",
                   f"search fairness: {cfg['streams']} plain streams, {cfg['max_tokens']} tokens\n"
                   f"{doc['machine']['cpu']} ({', '.join(doc['machine']['isa'])})",
                   goals=((2.0, "--", "goal <= 2x"),), size=(6, 3.5))


if __name__ == "__main__":
    main()
