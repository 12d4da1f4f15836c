"""`python -m bench.linear_routes`: milliseconds per call of each way to run the default model's
linears on this CPU, by rows M (1 = a decode step of one sequence; 256 = a prefill chunk).

Routes (server/models/linear.py builds the same ones): dense float32 (`F.linear`); dense bf16
with the weight pre-packed for oneDNN (where bf16 is native) and our small-M kernels over their
own packing: VDPBF16PS passes (kernels/csrc/gemv_cpu.cpp, AVX512-BF16) and AMX tiles
(kernels/csrc/amx_cpu.cpp; PackedLinear takes one of them up to `small_rows` rows, the tiles
where there are AMX and K % 32 == 0, up to 16 rows); weight-only int8
(`torch._weight_int8pack_mm`) over float32 and over bf16 activations; int8 dequantized to the
activation dtype inside the call; weight-only int4 (`_weight_int4pack_mm_for_cpu`, bf16
activations). Shapes: SmolLM2-135M's fused qkv, o, gate+up, down and LM head. Each point is
the median of `--reps` timed calls after warm-up, single process, torch's default threads.
Set ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 to see what an AVX2-only machine picks
(the record says which were set). Writes JSON (command, machine) and a PNG beside it.
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":  # see bench/methods_latency.py
    sys.path[0] = str(REPO)

from bench.machine import machine_info  # noqa: E402
from bench.plots import replot_if_asked, results_parser  # noqa: E402
from server.models.linear import (  # noqa: E402
    INT4_GROUP_SIZE,
    Int4Linear,
    PackedLinear,
    _small_m_kernels,
    has_native_bf16,
    quantize_int8,
)

SHAPES = {"wqkv": (960, 576), "wo": (576, 576), "w13": (3072, 576), "w2": (576, 1536), "lm_head": (49152, 576)}
ROWS = (1, 4, 8, 16, 64, 256)
ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")


def routes(weight: torch.Tensor) -> dict[str, tuple[torch.dtype, object]]:
    """name -> (activation dtype, fn(x)) for one float32 weight [N, K]."""
    q, scale = quantize_int8(weight)
    s32, s16 = scale.float(), scale.to(torch.bfloat16)
    out = {"dense_f32": (torch.float32, lambda x: F.linear(x, weight)),
           "int8_f32": (torch.float32, lambda x: torch._weight_int8pack_mm(x, q, s32)),
           "int8_bf16": (torch.bfloat16, lambda x: torch._weight_int8pack_mm(x, q, s16)),
           "int8_dequant_f32": (torch.float32, lambda x: F.linear(x, q.float() * s32[:, None]))}
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
    if has_native_bf16():
        packed = PackedLinear(linear)  # its forward picks a route by M: each route is timed alone here
        out["dense_bf16_packed"] = (torch.bfloat16, lambda x: torch.ops.mkldnn._linear_pointwise(
            x, packed.packed, None, "none", [], ""))
        if packed.small is not None:
            out["dense_bf16_small_m"] = (torch.bfloat16, lambda x: _small_m(x, packed, tiles=False))
            if _small_m_kernels().amx_linear_usable() and weight.shape[1] % 32 == 0:
                out["dense_bf16_amx_tiles"] = (torch.bfloat16, lambda x: _small_m(x, packed, tiles=True))
        out["int8_dequant_bf16"] = (torch.bfloat16, lambda x: F.linear(x, q.to(torch.bfloat16) * s16[:, None]))
    if weight.shape[1] % INT4_GROUP_SIZE == 0:
        out["int4_bf16"] = (torch.bfloat16, Int4Linear(linear))
    return out


def _small_m(x: torch.Tensor, packed: PackedLinear, tiles: bool) -> torch.Tensor:
    """The passes (tiles=False) or, up to small_m_rows(K) rows, the AMX tiles."""
    y = x.new_empty(x.shape[0], packed.out_features)
    _small_m_kernels().small_m_linear(y, x, packed.small, packed.small_bias, tiles)
    return y


def time_ms(fn, x: torch.Tensor, reps: int, budget_s: float = 2.0) -> float:
    """Median ms of `reps` calls after two warm-up calls; at least 3, fewer than `reps` once
    `budget_s` is spent (a slow route at M = 256 takes seconds a call)."""
    with torch.inference_mode():
        fn(x)
        fn(x)
        samples: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(samples) < reps and (len(samples) < 3 or time.perf_counter() < deadline):
            start = time.perf_counter()
            fn(x)
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def measure(reps: int) -> dict[str, dict[str, dict[str, float]]]:
    torch.manual_seed(0)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for shape_name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k) * 0.02
        for route, (dtype, fn) in routes(weight).items():
            for m in ROWS:
                if route == "dense_bf16_amx_tiles" and m > _small_m_kernels().small_m_rows(k):
                    continue  # past the tiles' rows the entry runs the passes
                x = torch.randn(m, k).to(dtype)
                table.setdefault(shape_name, {}).setdefault(route, {})[str(m)] = time_ms(fn, x, reps)
            print(shape_name, route, {m: round(v, 3) for m, v in table[shape_name][route].items()}, flush=True)
    return table


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(doc["ms"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6))
    for ax, shape in zip(axes, shapes):
        for route, by_m in doc["ms"][shape].items():
            ax.plot([int(m) for m in by_m], list(by_m.values()), marker="o", label=route)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{shape} {doc['shapes'][shape]}", fontsize=9)
        ax.set_xlabel("rows M")
    axes[0].set_ylabel("ms per call (median)")
    axes[-1].legend(fontsize=7)
    env = " ".join(f"{k}={v}" for k, v in doc["env"].items() if v) or "default ISA"
    fig.suptitle(f"linear routes, {doc['machine']['cpu']} ({env})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = results_parser(__doc__.splitlines()[0], REPO / "bench/results/linear_routes.json")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    if replot_if_asked(args, plot):
        return
    doc = {"benchmark": "linear_routes",
           "command": "python -m bench.linear_routes " + shlex.join(sys.argv[1:] if argv is None else argv),
           "machine": machine_info(), "env": {k: os.environ.get(k) for k in ENV},
           "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "native_bf16": has_native_bf16(), "threads": torch.get_num_threads(),
           "shapes": {k: list(v) for k, v in SHAPES.items()}, "ms": measure(args.reps)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, args.output.with_suffix(".png"))
    print(json.dumps({"output": str(args.output)}))


if __name__ == "__main__":
    main()
