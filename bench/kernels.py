"""Kernel microbenchmarks on one CUDA GPU: paged attention decode, window decode and prefill.

Run: `python -m bench.kernels --output bench/results/kernels` (or `python bench/kernels.py`).
In: CLI options. Out: a table on stdout, `<output>/kernels.json` and `<output>/kernels.png`.
Each point reports the kernel time, its achieved GB/s (bytes it must move / time) next to the
bandwidth of a large device-to-device copy measured in the same run, and the speed ratio vs
torch SDPA on a contiguous copy of the same cache (gathered outside the timed region).
Does not: check correctness (tests/kernels does), benchmark LoRA, or run on CPU beyond --help.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from collections.abc import Callable
from pathlib import Path

# NOTE: run as a file, sys.path[0] is bench/, where this very file would shadow the
# `kernels` package; put the repository root first instead.
if __package__ in (None, ""):
    _BENCH_DIR = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
    sys.path.insert(0, str(_BENCH_DIR.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--output", type=Path, default=Path("bench/results/kernels"),
                        help="directory for kernels.json and kernels.png")
    parser.add_argument("--batches", type=ints, default=[1, 8, 64], help="decode batch sizes")
    parser.add_argument("--contexts", type=ints,
                        default=[512, 1024, 2048, 4096, 8192, 16384, 32768],
                        help="decode context lengths")
    parser.add_argument("--window", type=int, default=4096, help="sliding window for decode")
    parser.add_argument("--window-batch", type=int, default=8)
    parser.add_argument("--prefill-lens", type=ints, default=[512, 1024, 2048, 4096, 8192],
                        help="single-sequence prefill lengths (no cached history)")
    parser.add_argument("--chunk", type=int, default=512,
                        help="chunked-prefill size appended to each prefill length as history")
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--copy-mib", type=int, default=1024,
                        help="size of the device-to-device copy that sets the bandwidth bar")
    parser.add_argument("--quick", action="store_true", help="a few points only (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.contexts, args.prefill_lens = [1, 8], [512, 4096], [1024]
    return args


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds per call; triton's do_bench flushes L2 between calls."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth_gbps(num_bytes: int, device: torch.device) -> float:
    """Achieved GB/s of a device-to-device copy (read + write), the practical HBM ceiling."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3) / 1e9


class PagedCache:
    """K/V for `batch` sequences of `context` positions in randomly permuted blocks."""

    def __init__(self, batch: int, context: int, args: argparse.Namespace,
                 device: torch.device) -> None:
        dtype, block_size = DTYPES[args.dtype], args.block_size
        blocks_per_seq = math.ceil(context / block_size)
        num_blocks = batch * blocks_per_seq + 1  # NOTE: block 0 stays reserved, as in the engine
        shape = (num_blocks, block_size, args.num_kv_heads, args.head_dim)
        self.k_cache = torch.randn(shape, dtype=dtype, device=device)
        self.v_cache = torch.randn(shape, dtype=dtype, device=device)
        ids = torch.randperm(num_blocks - 1, device=device) + 1
        self.block_tables = ids.view(batch, blocks_per_seq).to(torch.int32)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        self.batch, self.context = batch, context

    def contiguous_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, kv_heads, context, head_dim] copies for SDPA."""
        def gather(cache: torch.Tensor) -> torch.Tensor:
            blocks = cache[self.block_tables.long()]  # [B, n, block, kv_heads, D]
            flat = blocks.flatten(1, 2)[:, :self.context]
            return flat.transpose(1, 2).contiguous()
        return gather(self.k_cache), gather(self.v_cache)

    def kv_bytes(self, keys_read: int) -> int:
        """Bytes of K and V for `keys_read` positions per sequence."""
        _, _, kv_heads, head_dim = self.k_cache.shape
        return 2 * self.batch * keys_read * kv_heads * head_dim * self.k_cache.element_size()


def bench_decode(args: argparse.Namespace, device: torch.device, copy_gbps: float,
                 window: int | None, batches: list[int]) -> list[dict]:
    """Decode (one query per sequence) over batch x context; optionally windowed."""
    from kernels.paged_attention import paged_attention_triton

    rows = []
    dtype, heads, dim = DTYPES[args.dtype], args.num_heads, args.head_dim
    for batch in batches:
        for context in args.contexts:
            cache = PagedCache(batch, context, args, device)
            q = torch.randn(batch, heads, dim, dtype=dtype, device=device)
            out = torch.empty_like(q)
            qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
            call = lambda split: paged_attention_triton(  # noqa: E731
                q, cache.k_cache, cache.v_cache, cache.block_tables, cache.seq_lens, qsl,
                dim ** -0.5, window, split_k=split, out=out)
            ms = time_ms(lambda: call(None))
            ms_no_split = time_ms(lambda: call(False))
            keys_read = min(context, window) if window else context
            moved = cache.kv_bytes(keys_read) + 2 * q.numel() * q.element_size()
            row = dict(batch=batch, context=context, window=window, ms=ms,
                       ms_no_split=ms_no_split, gbps=moved / (ms * 1e-3) / 1e9)
            row["frac_of_copy"] = row["gbps"] / copy_gbps
            if window is None:
                row.update(_decode_vs_sdpa(cache, q, out, ms, call))
            rows.append(row)
            print(_fmt(row), flush=True)
            del cache, q, out
            torch.cuda.empty_cache()
    return rows


def _decode_vs_sdpa(cache: PagedCache, q: torch.Tensor, out: torch.Tensor, ms: float,
                    call: Callable[[bool | None], torch.Tensor]) -> dict:
    """SDPA on the gathered contiguous cache: its time, our speedup, and output agreement."""
    free, _ = torch.cuda.mem_get_info()
    if 2 * cache.k_cache.numel() * cache.k_cache.element_size() > 0.8 * free:
        return {"sdpa_ms": None, "speedup_vs_sdpa": None}
    k, v = cache.contiguous_kv()
    q4 = q.unsqueeze(2)  # [B, H, 1, D]
    sdpa = lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)  # noqa: E731
    sdpa_ms = time_ms(sdpa)
    call(None)
    err = (out.float() - sdpa().squeeze(2).float()).abs().max().item()
    del k, v
    return {"sdpa_ms": sdpa_ms, "speedup_vs_sdpa": sdpa_ms / ms, "max_abs_err_vs_sdpa": err}


def bench_prefill(args: argparse.Namespace, device: torch.device,
                  copy_gbps: float) -> list[dict]:
    """One sequence: full causal prefill of `n` tokens, then an `--chunk` chunk on n history."""
    from torch.nn.attention.bias import causal_lower_right

    from kernels.paged_attention import paged_attention_triton

    rows = []
    dtype, heads, dim = DTYPES[args.dtype], args.num_heads, args.head_dim
    for length in args.prefill_lens:
        for history in (0, length):
            num_queries = length if history == 0 else args.chunk
            context = history + num_queries
            cache = PagedCache(1, context, args, device)
            q = torch.randn(num_queries, heads, dim, dtype=dtype, device=device)
            out = torch.empty_like(q)
            qsl = torch.tensor([0, num_queries], dtype=torch.int32, device=device)
            ms = time_ms(lambda: paged_attention_triton(
                q, cache.k_cache, cache.v_cache, cache.block_tables, cache.seq_lens, qsl,
                dim ** -0.5, None, out=out))
            # Causal pairs: each query sees its history plus the queries up to itself.
            pairs = num_queries * history + num_queries * (num_queries + 1) // 2
            flops = 4 * heads * dim * pairs
            moved = cache.kv_bytes(context) + 2 * q.numel() * q.element_size()
            k, v = cache.contiguous_kv()
            q4 = q.transpose(0, 1).unsqueeze(0)  # [1, H, num_queries, D]
            mask = (causal_lower_right(num_queries, context) if history else None)
            sdpa_ms = time_ms(lambda: F.scaled_dot_product_attention(
                q4, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True))
            row = dict(prefill=num_queries, history=history, ms=ms,
                       tflops=flops / (ms * 1e-3) / 1e12,
                       gbps=moved / (ms * 1e-3) / 1e9, sdpa_ms=sdpa_ms,
                       speedup_vs_sdpa=sdpa_ms / ms)
            row["frac_of_copy"] = row["gbps"] / copy_gbps
            rows.append(row)
            print(_fmt(row), flush=True)
            del cache, q, out, k, v
            torch.cuda.empty_cache()
    return rows


def _fmt(row: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in row.items())


def write_plot(path: Path, results: dict) -> None:
    """Four panels: decode GB/s, decode speedup vs SDPA, window decode time, prefill TFLOP/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax_bw, ax_speed, ax_win, ax_pre = axes.flat
    decode = results["decode"]
    for batch in sorted({r["batch"] for r in decode}):
        pts = [r for r in decode if r["batch"] == batch]
        ctx = [r["context"] for r in pts]
        ax_bw.plot(ctx, [r["gbps"] for r in pts], marker="o", label=f"batch {batch}")
        speed = [(r["context"], r["speedup_vs_sdpa"]) for r in pts if r.get("speedup_vs_sdpa")]
        if speed:
            ax_speed.plot(*zip(*speed), marker="o", label=f"batch {batch}")
    ax_bw.axhline(results["copy_gbps"], color="k", ls="--", label="D2D copy")
    ax_bw.set(xscale="log", xlabel="context", ylabel="GB/s", title="decode: achieved bandwidth")
    ax_speed.axhline(1.0, color="k", ls="--")
    ax_speed.set(xscale="log", xlabel="context", ylabel="SDPA time / ours",
                 title="decode: speedup vs SDPA on contiguous cache")
    for key, label in (("window_decode", f"window {results['config']['window']}"),
                       ("full_decode", "no window")):
        pts = results.get(key, [])
        if pts:
            ax_win.plot([r["context"] for r in pts], [r["ms"] for r in pts], marker="o",
                        label=label)
    ax_win.set(xscale="log", yscale="log", xlabel="context", ylabel="ms",
               title=f"decode, batch {results['config']['window_batch']}: window vs full")
    for history, style in ((False, "-"), (True, ":")):
        pts = [r for r in results["prefill"] if bool(r["history"]) == history]
        if pts:
            x = [r["prefill"] + r["history"] for r in pts]
            tag = "chunk on history" if history else "full prefill"
            ax_pre.plot(x, [r["tflops"] for r in pts], style, marker="o", label=f"ours, {tag}")
            ax_pre.plot(x, [r["tflops"] / r["speedup_vs_sdpa"] for r in pts], style,
                        marker="x", label=f"SDPA, {tag}")
    ax_pre.set(xscale="log", xlabel="context", ylabel="TFLOP/s", title="prefill")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"paged attention on {results['device']} ({results['config']['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (only --help works on CPU).", file=sys.stderr)
        return 2
    import triton

    device = torch.device("cuda")
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth_gbps(args.copy_mib << 20, device)
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s", flush=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results: dict = {
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(),
        "config": config, "copy_gbps": copy_gbps,
    }
    print("== decode", flush=True)
    results["decode"] = bench_decode(args, device, copy_gbps, None, args.batches)
    print(f"== sliding-window decode (window {args.window})", flush=True)
    results["window_decode"] = bench_decode(args, device, copy_gbps, args.window,
                                            [args.window_batch])
    results["full_decode"] = [r for r in results["decode"] if r["batch"] == args.window_batch]
    print("== prefill", flush=True)
    results["prefill"] = bench_prefill(args, device, copy_gbps)

    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "kernels.json").write_text(json.dumps(results, indent=2))
    write_plot(args.output / "kernels.png", results)
    print(f"wrote {args.output / 'kernels.json'} and {args.output / 'kernels.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
