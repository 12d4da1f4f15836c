"""Linear layers stored the way this machine multiplies them fastest, chosen at load time.

After the checkpoint is loaded, `prepare_linears` swaps each projection (and the LM head) of a
`CausalLM` for one of:
- `PackedLinear`: oneDNN's pre-packed (blocked) weight layout, for bf16 on CPUs with native
  bf16 (AMX / AVX512-BF16). F.linear re-lays the weight out on every call; packing once
  roughly halves a decode step's matmul time there.
- `Int8Linear`: weight-only int8, one symmetric scale per output channel
  (torch._weight_int8pack_mm, bf16 activations: over float32 ones the kernel is 7-10x slower at
  every row count, AVX2 and AMX alike; bench/results/linear_routes_{cpu,avx2}.json).
- `Int4Linear`: weight-only int4, asymmetric per group of input channels
  (torch._weight_int4pack_mm_for_cpu, bf16 activations).
Everything else (CUDA, float32 on CPU) keeps nn.Linear. Each keeps `weight_dtype` so callers
know the activation dtype without reading a weight tensor.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

QUANTIZATIONS = ("none", "int8", "int4")
# oneDNN builds a primitive per row count M; steps past a few dozen rows pad M up to a multiple
# of this (CausalLM.row_bucket), so their counts repeat and are built once.
PACKED_ROW_BUCKET = 32
# PackedLinear takes the small-M kernels up to `small_m_rows(K)` rows (kernels/csrc/gemv_cpu.cpp):
# 16 where AMX tiles multiply (amx_cpu.cpp; K % 32 == 0), else 4, the VDPBF16PS passes' limit.
# Passes per call, one weight re-read from cache (bench/results/linear_routes_small_m_2026-12-07.json,
# AMX Xeon): 2.2-3.2x oneDNN's speed at 1 row (1.3x on the LM head), 1.1-2x at 4 (0.96x on
# the LM head), behind from 8 rows, where they turn compute-bound; tiles are not.
INT4_GROUP_SIZE = 32  # llama.cpp's Q4 groups are 32 wide too
_INT4_INNER_TILES = 8  # NOTE: the CPU int4 packing ignores this; 8 is what CUDA needs


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_native_bf16() -> bool:
    """True when bf16 matmuls run in hardware (AMX or AVX512-BF16): bf16 is then the fast dtype."""
    flags = cpu_flags()
    return bool({"amx_bf16", "avx512_bf16"} & flags) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_small_m(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N / 16, K / 2, 16, 2]: per block of 16 output columns, the (k, k + 1) pairs of
    the 16 columns side by side, the layout kernels/csrc/gemv_cpu.cpp multiplies."""
    n, k = weight.shape
    return weight.detach().view(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


class PackedLinear(nn.Module):
    """y = x W^T + b through oneDNN with the weight packed once; up to `small_rows` rows through
    our small-M kernels (kernels/csrc/gemv_cpu.cpp, amx_cpu.cpp) where the CPU has AVX512-BF16.

    Why both: a decode step's few rows make a linear one pass over its weights, and oneDNN's
    fixed setup per call (~19 us, 121 calls a step) is a large part of it; with more rows
    oneDNN's blocking wins.
    The cost: a second copy of the weights in memory (each step reads one of the two).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_dtype = linear.weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 16)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.small = self.small_bias = None
        self.small_rows = 0
        ext = _small_m_kernels()
        if ext is not None and self.out_features % 16 == 0 and self.in_features % 2 == 0:
            self.small = pack_small_m(linear.weight)
            self.small_bias = torch.empty(0) if self.bias is None else self.bias.float()
            self.small_rows = ext.small_m_rows(self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if self.small is not None and rows.shape[0] <= self.small_rows:
            y = rows.new_empty(rows.shape[0], self.out_features)
            _small_m_kernels().small_m_linear(y, rows if rows.stride(-1) == 1 else rows.contiguous(),
                                              self.small, self.small_bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.view(*shape[:-1], self.out_features)


@functools.lru_cache(maxsize=1)
def _small_m_kernels():
    """Our C++ module where it has the small-M kernel (AVX512-BF16 builds), else None."""
    from kernels import cpu_ext

    ext = cpu_ext.load()
    return ext if ext is not None and ext.small_m_linear_supported() else None


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight ≈ q * scale[:, None], q in [-127, 127], scale
    in `scale_dtype`, rounded up to it so that no weight is clipped (half a step at most)."""
    w = weight.detach().float()
    exact = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    scale = exact.to(scale_dtype)
    scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """Weight-only int8 linear over bf16 activations (dequantized reference: `dequantize()`)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_dtype = linear.weight.dtype
        self.qweight, self.scales = quantize_int8(linear.weight, torch.bfloat16)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.qweight, self.scales)
        y = y.to(self.weight_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` input channels: w ≈ (q - 8) * scale + zero,
    q in [0, 15] (the layout torch's int4 kernels expect). Returns q [N, K] uint8, scale, zero
    [N, K // group_size] float32."""
    n, k = weight.shape
    w = weight.detach().float().view(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    zero = lo + scale * 8.0  # the value of q = 8
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.view(n, k), scale, zero


class Int4Linear(nn.Module):
    """Weight-only int4 linear over bf16 activations (dequantized reference: `dequantize()`)."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_dtype = linear.weight.dtype
        self.group_size = group_size
        q, scale, zero = quantize_int4(linear.weight, group_size)
        self.q, self.scale, self.zero = q, scale, zero  # kept for dequantize() and tests
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), _INT4_INNER_TILES)
        # [K // group, N, 2]: (scale, zero) per group and output channel, as the kernel wants.
        self.scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(torch.bfloat16)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        q = self.q.float().view(n, k // self.group_size, self.group_size)
        w = (q - 8.0) * self.scale[..., None] + self.zero[..., None]
        return w.view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.packed,
                                              self.group_size, self.scales_and_zeros)
        y = y.to(self.weight_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def _fast_linear(linear: nn.Linear, quantization: str) -> nn.Module:
    if quantization == "int8":
        return Int8Linear(linear)
    if quantization == "int4":
        if linear.in_features % INT4_GROUP_SIZE:
            return Int8Linear(linear)  # NOTE: int4 groups must tile K; int8 has no such need
        return Int4Linear(linear)
    if linear.weight.dtype == torch.bfloat16 and has_native_bf16():
        return PackedLinear(linear)
    return linear


def prepare_linears(model: nn.Module, quantization: str = "none") -> dict[str, str]:
    """Swap the decoder's projections and LM head for their fast CPU form (in place).

    Returns {module kind: class name} of what was chosen, for the startup log.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r} ({'|'.join(QUANTIZATIONS)})")
    device = next(model.parameters()).device
    if device.type != "cpu":
        if quantization != "none":
            raise ValueError("--quantization int8|int4 runs on CPU only")
        return {}
    chosen: dict[str, str] = {}
    for layer in model.layers:
        for owner, name in ((layer.attention, "wqkv"), (layer.attention, "wo"),
                            (layer.mlp, "w13"), (layer.mlp, "w2")):
            fast = _fast_linear(getattr(owner, name), quantization)
            setattr(owner, name, fast)
            chosen[name] = type(fast).__name__
    # The LM head may be tied to the embedding: the embedding keeps its own dense weight.
    head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    head.weight = nn.Parameter(model.lm_head.weight.detach(), requires_grad=False)
    model.lm_head = _fast_linear(head, quantization)
    chosen["lm_head"] = type(model.lm_head).__name__
    if chosen["wqkv"] == PackedLinear.__name__:
        model.row_bucket = PACKED_ROW_BUCKET
    return chosen
