"""Adapter hot-swap under load: do 16 running streams stall while an adapter is loaded and
another evicted?

Starts `alignserve serve --max-loras 5` with 5 random rank-8 all-linear LoRA adapters, makes all
five resident, then runs 16 closed-loop streams over adapters 0-3 for `--duration` seconds,
twice: once undisturbed, once with a swap at half time. The swap loads a sixth adapter from
disk through `/v1/load_lora_adapter` and sends one request to it, which makes it resident in
the slot of the one idle adapter (lora4: evicted); then it unloads lora4. Reported per run:
inter-token latency (ITL) p50 / p99 / max of the 16 streams over the whole run and within
+-`--window` s of the swap time (the same window of the undisturbed run is the baseline), the
load call's latency and the new adapter's time to first token. Goal (issue 13): ITL p99 with
the swap within 2x of without. SGLang users report a 150x TTFT jump on eviction (sgl-project
/sglang PR #13349); this measures ours. `--new-rank` above 8 makes the new adapter wider than
the resident ones, so its load also grows every stack of the registry to its rank (the worst
case: `--new-rank 64`, the default `--max-lora-rank`). Writes JSON (command, machine) and a PNG.

    python -m bench.lora_swap --output bench/results/lora_swap_cpu.json
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
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":  # see bench/lora_throughput.py
    sys.path[0] = str(REPO)

from bench.machine import machine_info  # noqa: E402
from bench.plots import replot_if_asked, results_parser, save_bar_chart  # noqa: E402
from tests.adapters.real_lora import ALL_LINEAR, make_real_adapter  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402

STREAM_ADAPTERS = ["lora0", "lora1", "lora2", "lora3"]
IDLE_ADAPTER = "lora4"  # resident, unused by the streams: the one a new adapter evicts
NEW_ADAPTER = "fresh"


async def stream_worker(client: httpx.AsyncClient, i: int, until: float, max_tokens: int,
                        stamps: list[list[float]]) -> None:
    """Closed loop of streamed requests; each request's content-chunk arrival times."""
    j = 0
    while time.perf_counter() < until:
        body = {"model": STREAM_ADAPTERS[i % len(STREAM_ADAPTERS)], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "messages": [{"role": "user", "content": f"Topic {i}-{j}."}]}
        times: list[float] = []
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"content": ""' not in line:
                    times.append(time.perf_counter())
        stamps.append(times)
        j += 1


async def swap(client: httpx.AsyncClient, path: Path) -> dict:
    t0 = time.perf_counter()
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": NEW_ADAPTER, "lora_path": str(path)})
    r.raise_for_status()
    t1 = time.perf_counter()
    body = {"model": NEW_ADAPTER, "max_tokens": 4, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Hello."}]}
    first = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter()
    r = await client.post("/v1/unload_lora_adapter", json={"lora_name": IDLE_ADAPTER})
    r.raise_for_status()
    return {"swap_at": t0, "load_s": t1 - t0, "new_adapter_ttft_s": first - t1,
            "unload_s": time.perf_counter() - first}


def itl_stats(stamps: list[list[float]], lo: float = float("-inf"), hi: float = float("inf")) -> dict:
    gaps = sorted(b - a for times in stamps for a, b in zip(times, times[1:]) if lo <= b <= hi)
    if not gaps:
        return {"n": 0}
    return {"n": len(gaps), "p50_ms": 1e3 * statistics.median(gaps),
            "p99_ms": 1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], "max_ms": 1e3 * gaps[-1]}


async def run(base_url: str, streams: int, duration: float, max_tokens: int, window: float,
              new_path: Path | None) -> dict:
    stamps: list[list[float]] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        start = time.perf_counter()
        until = start + duration
        workers = [stream_worker(client, i, until, max_tokens, stamps) for i in range(streams)]

        async def at_half() -> dict:
            await asyncio.sleep(duration / 2)
            if new_path is None:
                return {"swap_at": time.perf_counter()}
            return await swap(client, new_path)

        *_, event = await asyncio.gather(*workers, at_half())
    at = event.pop("swap_at")
    return {"itl_all": itl_stats(stamps), "itl_window": itl_stats(stamps, at - window, at + window),
            "swap_offset_s": at - start, **event}


def main() -> None:
    parser = results_parser(__doc__.splitlines()[0], REPO / "bench/results/lora_swap_cpu.json")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--new-rank", type=int, default=8, help="rank of the adapter swapped in (others: 8)")
    args = parser.parse_args()
    if replot_if_asked(args, plot):
        return
    from server.models.default_model import ensure_default_model

    model_dir = ensure_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = STREAM_ADAPTERS + [IDLE_ADAPTER]
        for i, name in enumerate(names + [NEW_ADAPTER]):
            rank = args.new_rank if name == NEW_ADAPTER else 8
            make_real_adapter(model_dir, root / name, ALL_LINEAR, rank, seed=i)
        srv = ServerProcess("--dtype", args.dtype, "--max-loras", str(len(names)), "--num-kv-blocks", "4096",
                            "--adapter-root", str(root), *[x for n in names for x in ("--lora-modules", f"{n}={root / n}")])
        try:
            async def warm() -> None:  # every adapter resident, the idle one last used
                async with httpx.AsyncClient(base_url=srv.base_url, timeout=600) as c:
                    for name in names:
                        r = await c.post("/v1/chat/completions", json={
                            "model": name, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi."}]})
                        r.raise_for_status()
            asyncio.run(warm())
            without = asyncio.run(run(srv.base_url, args.streams, args.duration, args.max_tokens, args.window, None))
            with_swap = asyncio.run(run(srv.base_url, args.streams, args.duration, args.max_tokens, args.window,
                                        root / NEW_ADAPTER))
        finally:
            srv.stop()
    ratio = with_swap["itl_window"]["p99_ms"] / without["itl_window"]["p99_ms"]
    print(f"ITL p99 near the swap {with_swap['itl_window']['p99_ms']:.0f} ms vs {without['itl_window']['p99_ms']:.0f} "
          f"ms without ({ratio:.2f}x; goal <= 2x); load {with_swap['load_s'] * 1e3:.0f} ms, new adapter TTFT "
          f"{with_swap['new_adapter_ttft_s'] * 1e3:.0f} ms")
    doc = {"benchmark": "lora_swap", "command": " ".join(["python", "-m", "bench.lora_swap", *sys.argv[1:]]),
           "machine": machine_info(), "config": {k: v for k, v in vars(args).items() if k not in ("output", "replot")},
           "without_swap": without, "with_swap": with_swap, "itl_p99_ratio_near_swap": ratio}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, args.output.with_suffix(".png"))


def plot(doc: dict, path: Path) -> None:
    a, b = doc["without_swap"], doc["with_swap"]
    save_bar_chart(path, ["p99 all, no swap", "p99 all, swap", "p99 near, no swap", "p99 near, swap",
                          "max near, swap"],
                   [a["itl_all"]["p99_ms"], b["itl_all"]["p99_ms"], a["itl_window"]["p99_ms"],
                    b["itl_window"]["p99_ms"], b["itl_window"]["max_ms"]],
                   "inter-token latency (ms)",
                   f"adapter hot-swap under {doc['config']['streams']} streams\n{doc['machine']['cpu']}",
                   goals=((2 * a["itl_window"]["p99_ms"], "--", "2x p99 without swap"),), size=(7, 3.8))


if __name__ == "__main__":
    main()
