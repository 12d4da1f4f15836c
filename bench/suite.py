"""The command line every trained-adapter quality suite shares (rain_quality, search_vs_bon,
instruction_quality): --quick / --dtype / --seed / --adapter-root / --output / --replot, the
record's header (command, machine, model, dtypes, seed, sizes, note), its wall time, and the
JSON + PNG written beside each other. A suite supplies its sizes, `run(args, size)` and `plot`.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.machine import machine_info
from bench.plots import replot_if_asked, results_parser

REPO = Path(__file__).resolve().parent.parent
ADAPTERS = REPO / "bench/results/.adapters"  # NOTE: ignored by the .gitignore written into it
MODEL = "SmolLM2-135M-Instruct"
MODEL_NOTE = "default model = SmolLM2-135M-Instruct dequantised from Q4_1"


def served_dtype(name: str) -> str:
    """What `--dtype name` resolves to on this machine's CPU (auto: bf16 where it is native)."""
    import torch

    from server.engine.engine import resolve_dtype

    return str(resolve_dtype(name, torch.device("cpu"))).removeprefix("torch.")


def run_suite(name: str, description: str, sizes: dict[str, dict[str, Any]], run: Callable[[Any, dict], dict],
              plot: Callable[[dict, Path], None], note: str, headline: Callable[[dict], dict],
              argv: list[str] | None) -> dict | None:
    """Parse the shared options, run the suite, write bench/results/<name>.json (default) and its
    PNG, print `headline(doc)` with the output path; returns the record (None for --replot)."""
    p = results_parser(description, REPO / f"bench/results/{name}.json")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test's): minutes")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter-root", type=Path, default=ADAPTERS, help="where trained adapters and their data go")
    args = p.parse_args(argv)
    if replot_if_asked(args, plot):
        return None
    size = sizes["quick" if args.quick else "full"]
    start = time.perf_counter()
    doc = {"benchmark": name, "command": f"python -m bench.{name} " + shlex.join(sys.argv[1:] if argv is None else argv),
           "machine": machine_info(), "model": MODEL, "dtype": args.dtype, "served_dtype": served_dtype(args.dtype),
           "seed": args.seed, "config": size, "note": f"{MODEL_NOTE}; served with --dtype {args.dtype}; {note}",
           **run(args, size)}
    doc["wall_s"] = time.perf_counter() - start
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, args.output.with_suffix(".png"))
    print(json.dumps({"output": str(args.output), "wall_s": doc["wall_s"], **headline(doc)}))
    return doc
