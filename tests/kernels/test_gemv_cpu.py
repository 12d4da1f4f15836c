"""The small-M bf16 linears (kernels/csrc/gemv_cpu.cpp's VDPBF16PS passes, amx_cpu.cpp's AMX
tiles) against float64, and PackedLinear's use of them.

Oracle: y = x W^T + b in float64 from the same bf16 inputs. VDPBF16PS multiplies bf16 pairs
exactly and accumulates in float32, so the sum's error is at most (K/2 + 1) float32 roundings
of the running sum, each bounded by u32 * sum|x_k w_k|; the bias add one more; then one
rounding to bf16, at most u16 * |y| (u32 = 2^-24, u16 = 2^-8 relative, to nearest). TDPBF16PS
(tiles) may round after each product of a pair (Intel's SDM): K + 2 roundings there. A wrong
layout, a dropped pair, chunk or row, or a misplaced bias is off by O(|y|), far outside that.
"""
from __future__ import annotations

import pytest
import torch

from kernels import cpu_ext
from server.models.linear import PackedLinear, has_native_bf16, pack_small_m

EXT = cpu_ext.load()
pytestmark = pytest.mark.skipif(EXT is None or not EXT.small_m_linear_supported(),
                                reason="the small-M kernel needs a C++ build with AVX512-BF16")
U32, U16 = 2.0 ** -24, 2.0 ** -8
AMX = EXT is not None and EXT.amx_linear_usable()
ROUTES = [pytest.param(False, id="passes"),
          pytest.param(True, id="tiles", marks=pytest.mark.skipif(not AMX, reason="no AMX tiles here"))]


def takes_tiles(tiles: bool, rows: int, k: int) -> bool:
    """Whether small_m_linear multiplies on tiles for this call (else the passes)."""
    return tiles and rows <= 16 and k % 32 == 0


def bound(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, exact: torch.Tensor,
          additions: int | None = None) -> torch.Tensor:
    """`additions`: float32 roundings of the running sum (ours: K/2 pairs + the bias)."""
    magnitude = x.double().abs() @ w.double().abs().T
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    additions = x.shape[1] // 2 + 2 if additions is None else additions
    return additions * U32 * magnitude + U16 * exact.abs() * (1 + 1e-3) + 1e-30


def run(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, tiles: bool = False) -> torch.Tensor:
    y = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=torch.bfloat16)  # poisoned
    EXT.small_m_linear(y, x, pack_small_m(w), torch.empty(0) if bias is None else bias.float(), tiles)
    return y


@pytest.mark.parametrize("tiles", ROUTES)
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16, 17, 33])
@pytest.mark.parametrize(("k", "n"), [(2, 16), (64, 48), (576, 96), (1538, 32), (1536, 80)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_within_the_rounding_bound(tiles, rows, k, n, with_bias):
    gen = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16) if with_bias else None
    y = run(x, w, bias, tiles)
    exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
    err = (y.double() - exact).abs()
    assert torch.isfinite(y.float()).all()
    additions = k + 2 if takes_tiles(tiles, rows, k) else None
    assert (err <= bound(x, w, bias, exact, additions)).all(), err.max()


@pytest.mark.parametrize("tiles", ROUTES)
def test_rows_do_not_depend_on_the_batch(tiles):
    """Each row's sums run in the same order whatever M is: rows alone == rows in a batch of 13."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(13, 192, generator=gen).to(torch.bfloat16)
    w = torch.randn(80, 192, generator=gen).to(torch.bfloat16)
    batched = run(x, w, None, tiles)
    for r in range(13):
        assert torch.equal(run(x[r:r + 1], w, None, tiles), batched[r:r + 1]), r


@pytest.mark.skipif(not AMX or not has_native_bf16(), reason="needs AMX tiles and oneDNN's bf16 kernels")
def test_tiles_leave_onednn_its_own_tile_setup():
    """Tile configuration is per thread and oneDNN sets its own before each use; after our tiles
    ran (with another row count) on the same threads, oneDNN's results are what they were."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(256, 576, generator=gen).to(torch.bfloat16)
    x = torch.randn(40, 576, generator=gen).to(torch.bfloat16)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
    with torch.inference_mode():
        before = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        for rows in (3, 16, 7):
            run(x[:rows], w, None, tiles=True)
            assert torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), before), rows


@pytest.mark.parametrize("tiles", ROUTES)
def test_strided_rows_and_bad_shapes(tiles):
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(4, 256, generator=gen).to(torch.bfloat16)
    x = wide[:, :128]  # rows 256 apart
    w = torch.randn(32, 128, generator=gen).to(torch.bfloat16)
    assert torch.equal(run(x, w, None, tiles), run(x.contiguous(), w, None, tiles))
    y = torch.empty(4, 32, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="shapes"):
        EXT.small_m_linear(y, torch.zeros(4, 130, dtype=torch.bfloat16), pack_small_m(w), torch.empty(0))
    with pytest.raises(RuntimeError, match="bias"):
        EXT.small_m_linear(y, x, pack_small_m(w), torch.zeros(31))
    with pytest.raises(RuntimeError, match="bf16"):
        EXT.small_m_linear(y, x.float(), pack_small_m(w), torch.empty(0))


@pytest.mark.skipif(not has_native_bf16(), reason="PackedLinear needs native bf16 matmuls")
def test_packed_linear_takes_it_up_to_the_row_limit():
    """Up to small_rows rows (16 on AMX, K = 320 being a multiple of 32; else 4) PackedLinear's
    output is the kernel's (bitwise); past it, oneDNN's; both within the bound of float64."""
    gen = torch.Generator().manual_seed(11)
    linear = torch.nn.Linear(320, 144, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        linear.bias.copy_(torch.randn(144, generator=gen))
    packed = PackedLinear(linear)
    assert packed.small is not None and packed.small_rows == (16 if AMX else 4)
    w, b = linear.weight.detach(), linear.bias.detach()
    for rows in (1, packed.small_rows, packed.small_rows + 1, 40):
        x = torch.randn(rows, 320, generator=gen).to(torch.bfloat16)
        with torch.inference_mode():
            y = packed(x)
        exact = x.double() @ w.double().T + b.double()
        # oneDNN's order of additions is its own: allow one rounding per product.
        assert (((y.double() - exact).abs()) <= bound(x, w, b, exact, additions=320 + 2)).all(), rows
        if rows <= packed.small_rows:
            assert torch.equal(y, run(x, w, b, tiles=True)), rows
