"""Ray Serve replicas on this machine: one server vs 1 vs 2 replicas (output tokens/s, TTFT).

Starts, in turn, `alignserve serve` (one process, no Ray), `--replicas 1` and `--replicas 2`
(local Ray), and drives each with the load tool (bench/load.py: greedy streamed chat,
synthetic prompts, closed-loop clients at each concurrency). On a 2-core machine two replicas
split the same cores, so this measures the cost of the ingress hop and of two engines sharing
the CPU, not scaling; replicas pay off with a machine (or GPU) each. Writes JSON + PNG.

    python -m bench.scale_replicas --output bench/results/scale_replicas.json
"""
from __future__ import annotations

import json
import platform
import subprocess
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

from bench.config import LengthSpec, Level, LoadConfig, PromptConfig, Target  # noqa: E402
from bench.load import run_load_sync  # noqa: E402
from bench.plots import replot_if_asked, results_parser  # noqa: E402

SETUPS = {"single": (), "ray-1": ("--replicas", "1"), "ray-2": ("--replicas", "2")}


def start(args: tuple[str, ...], port: int, log: Path) -> subprocess.Popen:
    """`alignserve serve` on 127.0.0.1:port; returns once /health answers 200."""
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--dtype", "float32", "--num-kv-blocks", "512", "--max-model-len", "1024",
           "--index-root", str(log.parent / "indexes"), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{' '.join(args) or 'single'} did not come up; see {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    parser = results_parser(__doc__.splitlines()[0], REPO / "bench/results/scale_replicas.json")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--setups", default=",".join(SETUPS))
    args = parser.parse_args()
    if replot_if_asked(args, plot):
        return
    from tests.conftest import free_port

    levels = tuple(Level(concurrency=int(c)) for c in args.concurrency.split(","))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.setups.split(","):
            port = free_port()
            proc = start(SETUPS[name], port, Path(tmp) / f"{name}.log")
            try:
                cfg = LoadConfig(targets=(Target(name, f"http://127.0.0.1:{port}/v1"),), levels=levels,
                                 prompts=PromptConfig(input_len=LengthSpec(args.input_len, args.input_len),
                                                      output_len=LengthSpec(args.output_len, args.output_len)),
                                 num_requests=args.num_requests, ignore_eos=True, warmup=2, timeout=1800,
                                 progress=False)
                for result in run_load_sync(cfg):
                    s = result.summary
                    runs.append({"setup": name, "concurrency": result.level.concurrency,
                                 "completed": s["completed"], "failed": s["failed"],
                                 "output_tokens_per_s": s["output_throughput"],
                                 "ttft_ms_mean": s["ttft_ms"]["mean"], "ttft_ms_p50": s["ttft_ms"]["p50"],
                                 "tpot_ms_mean": s["tpot_ms"]["mean"]})
                    print(f"{name:7s} c={result.level.concurrency:<3d} {s['output_throughput']:7.1f} tok/s  "
                          f"TTFT mean {s['ttft_ms']['mean']:.0f} ms  failed {s['failed']}", flush=True)
            finally:
                stop(proc)
    doc = {"benchmark": "scale_replicas", "command": "python -m bench.scale_replicas " + " ".join(sys.argv[1:]),
           "machine": f"{platform.machine()} {platform.processor()} cpu, 2 cores shared with other jobs",
           "note": "2 cores: replicas share the same CPUs, so this shows the Ray hop's overhead, not scaling",
           "config": vars(args) | {"output": str(args.output)}, "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, args.output.with_suffix(".png"))


def plot(doc: dict, path: Path) -> None:
    """Output tokens/s and mean TTFT per setup, one group of bars per concurrency."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    setups = list(dict.fromkeys(r["setup"] for r in runs))
    levels = sorted({r["concurrency"] for r in runs})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    width = 0.8 / max(1, len(setups))
    for i, setup in enumerate(setups):
        by = {r["concurrency"]: r for r in runs if r["setup"] == setup}
        xs = [j + i * width for j in range(len(levels))]
        axes[0].bar(xs, [by[c]["output_tokens_per_s"] if c in by else 0 for c in levels], width, label=setup)
        axes[1].bar(xs, [(by[c]["ttft_ms_mean"] or 0) if c in by else 0 for c in levels], width, label=setup)
    for ax, ylabel in zip(axes, ("output tokens / s", "mean TTFT (ms)")):
        ax.set_xticks([j + width * (len(setups) - 1) / 2 for j in range(len(levels))], [f"c={c}" for c in levels])
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle("alignserve: one server vs Ray Serve replicas, SmolLM2-135M, CPU (2 shared cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
