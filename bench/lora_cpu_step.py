"""`python -m bench.lora_cpu_step`: what the LoRA deltas of one decode step cost on CPU, per route.

Applies rank-`--rank` deltas to the 7 projections x 30 layers of SmolLM2-135M's shapes (random
stacks per layer and module, laid out as the registry lays them out on CPU) for `--rows` rows in
`--dtype` activations, and times the whole step's LoRA work through `kernels.dispatch.lora_apply`:
- `torch`: the torch route and its plan (slots with >= GATHER_MAX_ROWS rows get their own pair of
  matmuls, the rest one gathered group of torch ops);
- `cpp`: the C++ BGMV (kernels/csrc/lora_cpu.cpp) and its plan (every adapter row gathered);
- `stack's call`: that op called directly, as the decode stack (DecoderStack) calls it;
for 1 and 16 adapters among the rows, with float32 stacks and stacks in the activations' dtype;
16 adapters with cold caches (300 MB read per step in slices between projections, untimed, as
a step's base weights stream through) with slots `--rank` and 64 ranks apart; and, for the plan's choice, one
adapter's rows as one dense group vs gathered at 16 .. 1024 rows.
Cases run in turn, `--repeats` times round-robin (so drift lands on all alike); medians are
reported. Runs off the main thread, as the server's engine does. Writes JSON + PNG.

    python -m bench.lora_cpu_step --output bench/results/lora_cpu_step.json
"""
from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from bench.machine import machine_info
from bench.plots import replot_if_asked, results_parser
from kernels import cpu_ext, dispatch
from kernels.lora import GATHER_MAX_ROWS, group_rows

REPO = Path(__file__).resolve().parent.parent
# SmolLM2-135M: module -> (in, out); 30 layers.
SHAPES = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576),
          "gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}
LAYERS = 30
EVICT_BYTES = 300 * 2**20  # read per step, a slice before each projection, in the cold cases: past this VM's caches


def make_case(adapters: int, rows: int, rank: int, act_dtype: torch.dtype, stack_dtype: torch.dtype,
              route: str, plan: str, stack_rank: int | None = None, evict: torch.Tensor | None = None):
    """A callable that runs one step's LoRA work, for rows spread round-robin over `adapters`, and
    returns its seconds. Slots lie `stack_rank` (default `rank`) ranks apart, as in the registry's
    stacks. With `evict`, a slice of it is read before each projection, as a step's base weights
    stream through the caches between its LoRA calls (that reading is not timed)."""
    gen = torch.Generator().manual_seed(adapters * 1000 + rows)
    apart = stack_rank or rank

    def stack(n: int) -> torch.Tensor:  # [adapters, apart, n], the first `rank` ranks filled
        out = torch.zeros(adapters, apart, n, dtype=stack_dtype)
        out[:, :rank] = torch.randn(adapters, rank, n, generator=gen).mul(0.02)
        return out

    stacks = {(layer, m): (stack(i).transpose(1, 2), stack(o), torch.ones(adapters))
              for layer in range(LAYERS) for m, (i, o) in SHAPES.items()}
    slices = [] if evict is None else evict.chunk(LAYERS * len(SHAPES))
    ext, no_rows = cpu_ext.load(), torch.empty(0, dtype=torch.long)
    slots = [r % adapters for r in range(rows)]
    indices = torch.tensor(slots)
    ranks = {s: rank for s in range(adapters)}
    backend = "torch" if route == "torch" else "auto"
    if plan == "runner":  # as the runner plans a step
        groups = dispatch.lora_plan(slots, ranks, torch.device("cpu"), act_dtype, backend)
    else:  # gather_max_rows 1: every slot its own dense pair of matmuls; None: all rows gathered
        groups = group_rows(slots, ranks, 1 if plan == "dense" else None)
    xs = {i: torch.randn(rows, i, generator=gen).to(act_dtype) for i in (576, 1536)}
    ys = {m: torch.zeros(rows, o, dtype=act_dtype) for m, (_, o) in SHAPES.items()}

    def step() -> float:
        seconds = 0.0
        for layer in range(LAYERS):
            for k, (m, (i, _)) in enumerate(SHAPES.items()):
                if slices:
                    slices[layer * len(SHAPES) + k].sum()
                start = time.perf_counter()
                if route == "stack":  # the op as DecoderStack calls it, past kernels.dispatch
                    lora_a, lora_b, scales = stacks[(layer, m)]
                    ext.lora_bgmv(ys[m], xs[i], lora_a.transpose(1, 2), lora_b, scales, indices, no_rows, rank)
                else:
                    dispatch.lora_apply(ys[m], xs[i], *stacks[(layer, m)], indices, backend=backend,
                                        groups=groups)
                seconds += time.perf_counter() - start
        return seconds
    return step


def build_cases(args) -> dict:
    """Every case of the run, by label."""
    act = getattr(torch, args.dtype)
    cases = {}
    for adapters in (1, 16):
        for stack in (torch.float32, act):
            for route in ("torch", "cpp"):
                label = f"{adapters} adapters, {str(stack).removeprefix('torch.')} stacks, {route}"
                cases[label] = make_case(adapters, args.rows, args.rank, act, stack, route, "runner")
    # Cold caches, as in a server's step: 16 adapters' rows with their slots `stack_rank` ranks
    # apart (the registry's stacks grow to the adapters' rank; before, they held --max-lora-rank 64).
    evict = torch.ones(EVICT_BYTES // 4)
    for stack_rank in (args.rank, 64):
        cases[f"16 adapters, {str(act).removeprefix('torch.')} stacks, stack's call, cold, slots {stack_rank} "
              "ranks apart"] = make_case(16, args.rows, args.rank, act, act, "stack", "runner", stack_rank, evict)
    for rows in (16, 64, 256, 1024):  # one adapter's rows: the plan's dense pair vs the C++ gather
        for plan in ("dense", "gathered"):
            cases[f"1 adapter x {rows} rows, {plan}"] = make_case(1, rows, args.rank, act, torch.float32,
                                                                  "torch" if plan == "dense" else "cpp", plan)
    return cases


def run_cases(cases: dict, repeats: int) -> dict[str, list[float]]:
    """ms per call of each case, `repeats` round-robin passes after one warm-up pass."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(repeats + 1):
        for name, step in cases.items():
            seconds = step()
            if i:
                times[name].append(seconds * 1e3)
    return times


def main() -> None:
    parser = results_parser(__doc__.splitlines()[0], REPO / "bench/results/lora_cpu_step.json")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", help="the activations' dtype")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if replot_if_asked(args, plot):
        return
    if cpu_ext.load() is None:
        sys.exit("the C++ kernels did not build here: nothing to compare")
    out: dict = {}
    # Built and run off the main thread, and nothing run on the main thread before: a main thread
    # that did OpenMP work slows the other threads' ops (server.engine.async_engine).
    worker = threading.Thread(target=lambda: out.update(times=run_cases(build_cases(args), args.repeats)))
    worker.start()
    worker.join()
    results = [{"case": name, "ms_per_step_median": statistics.median(ts), "ms_per_step": ts}
               for name, ts in out["times"].items()]
    for r in results:
        print(f"{r['case']:45s} {r['ms_per_step_median']:8.2f} ms")
    doc = {"benchmark": "lora_cpu_step", "command": " ".join(["python -m bench.lora_cpu_step", *sys.argv[1:]]),
           "machine": machine_info(), "config": vars(args) | {"output": str(args.output)},
           "gather_max_rows_torch_route": GATHER_MAX_ROWS, "results": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, args.output.with_suffix(".png"))


def plot(doc: dict, path: Path) -> None:
    """Horizontal bars of each case's median ms per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    fig, ax = plt.subplots(figsize=(8, 6))
    ax.barh([r["case"] for r in results][::-1], [r["ms_per_step_median"] for r in results][::-1])
    ax.set_xscale("log")
    ax.set_xlabel("ms of LoRA work per decode step (median, log scale)")
    ax.set_title(f"LoRA deltas of one step on CPU: SmolLM2-135M shapes, rank {doc['config']['rank']}, "
                 f"{doc['config']['rows']} rows, {doc['config']['dtype']} activations", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
