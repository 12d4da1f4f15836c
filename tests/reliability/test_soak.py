"""Soak (`make test-slow`): >= 20 minutes of mixed steady load, with the server's RSS, KV blocks
and open file descriptors sampled; their growth after warm-up must be flat.

Mixed traffic from 6 client loops: plain chat and completions, a LoRA adapter, DoLa,
best-of-2, and streams cut after their first chunk. `ALIGNSERVE_SOAK_S` shortens it for a
trial run; the report (samples, growth) goes to `ALIGNSERVE_SOAK_REPORT`
(default bench/results/soak.json).
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import psutil
import pytest

from bench.machine import machine_info
from tests.adapters.real_lora import ATTENTION, make_real_adapter
from tests.conftest import REPO, ServerProcess
from tests.reliability.helpers import BASE, metric, wait_drained

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DURATION_S = float(os.environ.get("ALIGNSERVE_SOAK_S", 1200))
REPORT = Path(os.environ.get("ALIGNSERVE_SOAK_REPORT", REPO / "bench" / "results" / "soak.json"))
SAMPLE_EVERY_S = 10.0
WARMUP_FRACTION = 0.25  # allocator pools and caches fill first; growth is judged after that
RSS_GROWTH_LIMIT = 64 * 2**20  # over the judged window; a leak of one request's state per request passes it
FD_GROWTH_LIMIT = 4


def payloads(i: int) -> list[tuple[str, dict, bool]]:
    """(path, body, cut after first chunk) for loop i's next requests, cycling through kinds."""
    chat = {"messages": [{"role": "user", "content": f"Write a short note #{i}."}], "max_tokens": 24,
            "temperature": 0.8, "seed": i}
    return [
        ("/v1/chat/completions", {"model": BASE, **chat}, False),
        ("/v1/chat/completions", {"model": "alpha", **chat}, False),
        ("/v1/completions", {"model": BASE, "prompt": f"Item {i}:", "max_tokens": 24}, False),
        ("/v1/chat/completions", {"model": BASE, **chat, "dola_layers": "high"}, False),
        ("/v1/chat/completions", {"model": BASE, **chat, "best_of": 2}, False),
        ("/v1/chat/completions", {"model": "alpha", **chat, "stream": True, "max_tokens": 200}, True),
    ]


async def client_loop(srv, loop_id: int, until: float, counts: dict[str, int]) -> None:
    async with httpx.AsyncClient(timeout=300, headers=srv.headers()) as client:
        i = loop_id
        while time.monotonic() < until:
            path, body, cut = payloads(i)[i % 6]
            i += 6
            if cut:
                async with client.stream("POST", srv.base_url + path, json=body) as r:
                    counts[str(r.status_code)] = counts.get(str(r.status_code), 0) + 1
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break
            else:
                r = await client.post(srv.base_url + path, json=body)
                counts[str(r.status_code)] = counts.get(str(r.status_code), 0) + 1


async def sampler(srv, proc: psutil.Process, until: float, samples: list[dict]) -> None:
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=60, headers=srv.headers()) as client:
        while time.monotonic() < until:
            text = (await client.get(srv.base_url + "/metrics")).text
            used = next(float(line.split()[1]) for line in text.splitlines()
                        if line.startswith("alignserve_kv_cache_used_blocks "))
            samples.append({"t": round(time.monotonic() - start, 1), "rss_bytes": proc.memory_info().rss,
                            "open_fds": proc.num_fds(), "kv_used_blocks": used})
            await asyncio.sleep(SAMPLE_EVERY_S)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope: growth per second, robust to the saw-tooth of a busy allocator."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def test_soak_is_flat(model_dir, tmp_path):
    make_real_adapter(model_dir, tmp_path / "alpha", ATTENTION, 8, 1)
    srv = ServerProcess("--lora-modules", f"alpha={tmp_path / 'alpha'}", "--num-kv-blocks", "1024",
                        "--max-model-len", "512", api_key="k")
    try:
        proc = psutil.Process(srv.proc.pid)
        samples: list[dict] = []
        counts: dict[str, int] = {}

        async def main():
            until = time.monotonic() + DURATION_S
            await asyncio.gather(sampler(srv, proc, until, samples),
                                 *(client_loop(srv, k, until, counts) for k in range(6)))

        asyncio.run(main())
        wait_drained(srv)
        final_blocks = metric(srv, "alignserve_kv_cache_used_blocks")
    finally:
        srv.stop()
    judged = [s for s in samples if s["t"] >= WARMUP_FRACTION * DURATION_S]
    ts = [s["t"] for s in judged]
    window = ts[-1] - ts[0]
    rss_growth = slope(ts, [s["rss_bytes"] for s in judged]) * window
    fd_growth = max(s["open_fds"] for s in judged) - judged[0]["open_fds"]
    report = {"duration_s": DURATION_S, "machine": machine_info(),
              "requests_by_status": counts, "judged_window_s": window,
              "rss_growth_bytes_over_window": rss_growth, "rss_limit_bytes": RSS_GROWTH_LIMIT,
              "fd_growth_over_window": fd_growth, "kv_used_blocks_after_drain": final_blocks,
              "kv_used_blocks_max": max(s["kv_used_blocks"] for s in samples), "samples": samples,
              "command": f"ALIGNSERVE_SOAK_S={DURATION_S:g} make test-slow "
                         f"(pytest -m slow tests/reliability/test_soak.py)"}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=1))
    plot(report, REPORT.with_suffix(".png"))
    assert set(counts) == {"200"}, counts
    assert final_blocks == 0
    assert rss_growth < RSS_GROWTH_LIMIT, report["rss_growth_bytes_over_window"]
    assert fd_growth <= FD_GROWTH_LIMIT


def plot(report: dict, path: Path) -> None:
    """RSS, open fds and KV blocks in use over the soak."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(7, 6), sharex=True)
    for ax, key, scale, label in ((axes[0], "rss_bytes", 2**20, "server RSS (MiB)"),
                                  (axes[1], "open_fds", 1, "open fds"),
                                  (axes[2], "kv_used_blocks", 1, "KV blocks in use")):
        ax.plot(t, [s[key] / scale for s in samples])
        ax.set_ylabel(label)
    axes[0].axvline(WARMUP_FRACTION * report["duration_s"] / 60, ls=":", color="gray", label="warm-up ends")
    axes[0].legend(loc="lower right")
    axes[2].set_xlabel("minutes")
    growth = report["rss_growth_bytes_over_window"] / 2**20
    fig.suptitle(f"soak: {sum(report['requests_by_status'].values())} mixed requests, RSS growth after "
                 f"warm-up {growth:.1f} MiB, fd growth {report['fd_growth_over_window']}\n"
                 f"{report['machine'].get('cpu', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # replot a recorded run: python -m tests.reliability.test_soak
    recorded = json.loads(REPORT.read_text())
    plot(recorded, REPORT.with_suffix(".png"))
