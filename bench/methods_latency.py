"""Test-time method cost: end-to-end latency of one request per method, relative to plain sampling.

Starts `alignserve serve` with a random rank-8 ARM (attention LoRA) and a random reward
model (LoRA + score head) loaded with --lora-modules, then sends the same chat request one at
a time (no other load) as: plain sampling, best-of-4 and best-of-8 scored by the RM, GenARM
(alpha 1) and DoLa ("high" layers). Every request generates exactly --max-tokens tokens
(ignore_eos), so the ratios compare equal work per output. Median of --repeats runs after one
untimed warm-up each. Project goals (shared/methods.md): best-of-8 <= 2.5x and GenARM <= 2x.

    python -m bench.methods_latency --output bench/results/methods_latency_cpu.json
"""
from __future__ import annotations

import json
import platform
import statistics
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

from bench.plots import replot_if_asked, results_parser, save_bar_chart  # noqa: E402
from tests.adapters.real_lora import ATTENTION, make_real_adapter  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402
from tests.methods.adapters import make_reward_adapter  # noqa: E402

METHODS = {
    "plain": {},
    "best_of_4": {"best_of": 4, "reward_model": "rm"},
    "best_of_8": {"best_of": 8, "reward_model": "rm"},
    "genarm": {"genarm": {"reward_model": "arm", "alpha": 1.0}},
    "dola": {"dola_layers": "high", "repetition_penalty": 1.2},
}


def timed_request(base_url: str, extra: dict, max_tokens: int, seed: int) -> float:
    body = {"messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0, "seed": seed, **extra}
    start = time.perf_counter()
    r = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - start


def main() -> None:
    parser = results_parser(__doc__.splitlines()[0], REPO / "bench/results/methods_latency_cpu.json")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if replot_if_asked(args, plot):
        return
    from server.models.default_model import ensure_default_model

    model_dir = ensure_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_real_adapter(model_dir, root / "arm", ATTENTION, 8, seed=1)
        make_reward_adapter(model_dir, root / "rm", seed=2)
        srv = ServerProcess("--num-kv-blocks", "2048", "--lora-modules", f"arm={root / 'arm'}",
                            "--lora-modules", f"rm={root / 'rm'}")
        try:
            runs = []
            for name, extra in METHODS.items():
                timed_request(srv.base_url, extra, args.max_tokens, seed=0)  # warm-up
                times = [timed_request(srv.base_url, extra, args.max_tokens, seed=i + 1) for i in range(args.repeats)]
                runs.append({"method": name, "options": extra, "latency_s": times,
                             "median_s": statistics.median(times)})
                print(f"{name:10s} median {runs[-1]['median_s']:.2f} s  {times}")
        finally:
            srv.stop()
    plain = runs[0]["median_s"]
    for r in runs:
        r["relative_to_plain"] = r["median_s"] / plain
    doc = {"benchmark": "methods_latency", "command": " ".join(["python", "-m", "bench.methods_latency", *sys.argv[1:]]),
           "machine": f"{platform.machine()} cpu, {__import__('os').cpu_count()} cores",
           "config": {"max_tokens": args.max_tokens, "repeats": args.repeats}, "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, args.output.with_suffix(".png"))


def plot(doc: dict, path: Path) -> None:
    """Bar chart of latency relative to plain sampling, with the project's goal lines."""
    runs = doc["runs"]
    save_bar_chart(path, [r["method"] for r in runs], [r["relative_to_plain"] for r in runs],
                   "latency / plain sampling",
                   f"alignserve method latency, {doc['config']['max_tokens']} tokens, one request at a time\n"
                   f"SmolLM2-135M float32, {doc['machine']}",
                   goals=((2.5, "--", "goal: best-of-8 <= 2.5x"), (2.0, ":", "goal: GenARM <= 2x")), size=(6, 3.5))


if __name__ == "__main__":
    main()
