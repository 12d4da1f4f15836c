"""`python -m bench.wave_split A.json B.json ...`: TTFT of a closed loop's first wave vs the requests
after it, from `alignserve bench load --output` files (per-request records).

Why: at concurrency c a closed loop opens with c requests at once, a burst, and every later
request starts when one before it ends. A scheduler can treat the two differently (the prefill
groups of server/engine/scheduler.py change little for the burst and much for what follows), so
one TTFT median over both hides which one moved. Requests that started within `--burst-s` of the
level's start are the first wave. Writes a JSON summary (and prints it) with the inputs named.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False)


def split(run: dict, burst_s: float) -> dict:
    """First-wave and later TTFT medians (ms) and counts of one (target, level) run."""
    ok = [r for r in run["requests"] if r["ok"] and r["ttft_ms"] is not None]
    first = [r["ttft_ms"] for r in ok if r["start_s"] < burst_s]
    later = [r["ttft_ms"] for r in ok if r["start_s"] >= burst_s]
    median = (lambda xs: round(statistics.median(xs), 1) if xs else None)
    return {"target": run["target"], "level": run["level"], "n_first": len(first), "n_later": len(later),
            "ttft_p50_first_ms": median(first), "ttft_p50_later_ms": median(later),
            "ttft_p50_all_ms": median(first + later),
            "output_tok_s": run["summary"]["output_throughput"]}


@app.command()
def main(
    files: Annotated[list[Path], typer.Argument(help="bench load --output JSON files.")],
    burst_s: Annotated[float, typer.Option(help="Requests started before this (s) are the first wave.")] = 0.1,
    out: Annotated[Path | None, typer.Option(help="Where the summary JSON goes.")] = None,
) -> None:
    """Print (and write) the first-wave / later TTFT split of every run in FILES."""
    rows = []
    for path in files:
        for run in json.loads(path.read_text())["runs"]:
            rows.append({"file": str(path), **split(run, burst_s)})
            r = rows[-1]
            typer.echo(f"{path.name} {r['target']} {r['level']}: first wave n={r['n_first']} "
                       f"p50 {r['ttft_p50_first_ms']} ms | later n={r['n_later']} p50 {r['ttft_p50_later_ms']} "
                       f"ms | all {r['ttft_p50_all_ms']} ms | {r['output_tok_s']:.1f} tok/s")
    if out is not None:
        doc = {"tool": "bench.wave_split", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "command": " ".join(["python -m bench.wave_split", *sys.argv[1:]]), "burst_s": burst_s, "rows": rows}
        out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    app()
