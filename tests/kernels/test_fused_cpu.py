"""The fused C++ decoder ops (kernels/csrc/fused_cpu.cpp) against float64 oracles written here.

Each op computes in float32 and rounds once per output, so against the float64 result its
error is at most one unit in the last place of the output dtype (half an ulp of rounding, plus
float32 error far below that which can still tip a value across a rounding boundary). In
float32 the bound is the float32 error itself: a few ulp (derived per op below). Outputs are
NaN-poisoned first, so an element the kernel never writes fails.
"""
from __future__ import annotations

import pytest
import torch

from kernels import cpu_ext, fused
from kernels.paged_attention_cpu import plan_attention
from tests.kernels.helpers import DTYPES, case_seed

MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
SHAPES = [(1, 576), (7, 64), (130, 100)]  # a decode row, a small batch, rows past one task, odd widths


def ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |ref| (float64), floored at the smallest normal's."""
    smallest = torch.finfo(dtype).tiny
    exponent = torch.floor(torch.log2(ref.abs().clamp_min(smallest)))
    return torch.pow(2.0, exponent - MANTISSA_BITS[dtype])


def assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    assert torch.isfinite(out).all(), "NaN/inf in the output (an element never written?)"
    err = (out.double() - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3g}x the bound"


def bound_for(ref: torch.Tensor, dtype: torch.dtype, float32_ulps: float) -> torch.Tensor:
    if dtype == torch.float32:
        return float32_ulps * ulp(ref, torch.float32)
    return ulp(ref, dtype)


def randn(shape, dtype, seed) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(ext, dtype, shape, with_residual):
    dt = DTYPES[dtype]
    seed = case_seed("rms", dtype, shape, with_residual)
    x, residual = randn(shape, dt, seed), randn(shape, dt, seed + 1)
    weight = randn(shape[1:], dt, seed + 2)
    normed = torch.full(shape, float("nan"), dtype=dt)
    if with_residual:
        h = torch.full(shape, float("nan"), dtype=dt)
        ext.rms_norm(normed, h, x, residual, weight, 1e-5)
        # The residual stream is rounded as torch rounds x + residual: bit for bit.
        assert torch.equal(h, x + residual)
    else:
        ext.rms_norm(normed, x, x, x[:0], weight, 1e-5)
        h = x
    h64 = h.double()
    ref = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    # float32: the sum of squares of n terms is off by up to n/2 ulp relative (pairwise
    # summation does better; this is the plain worst case), halved by the square root, plus
    # the three products' roundings.
    assert_within(normed, ref, bound_for(ref, dt, shape[1] / 4 + 4))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_silu_and_mul(ext, dtype, shape):
    dt = DTYPES[dtype]
    seed = case_seed("silu", dtype, shape)
    gate_up = randn((shape[0], 2 * shape[1]), dt, seed) * 4  # exp over a wide range of inputs
    gate_up[0, :5] = torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0]).to(dt)  # tails of the exp
    out = torch.full(shape, float("nan"), dtype=dt)
    ext.silu_and_mul(out, gate_up)
    g, u = gate_up.double().chunk(2, dim=-1)
    ref = g * torch.sigmoid(g) * u
    # float32: exp to ~2 ulp, then an add, a division and two products, one ulp each. Where
    # gate < -87.3 the exp's input is clamped (no overflow), leaving |gate * up| * e^-87.3 in
    # place of a value that is smaller still: an absolute slack below float32's smallest normal.
    bound = bound_for(ref, dt, 8) + (g * u).abs() * 2.0 ** -125
    assert_within(out, ref, bound)


def test_silu_and_mul_keeps_nan(ext):
    """A NaN input must come out NaN (the exp clamps by comparison, not fmin/fmax)."""
    gate_up = torch.ones(1, 8, dtype=torch.bfloat16)
    gate_up[0, 1] = float("nan")
    out = torch.zeros(1, 4, dtype=torch.bfloat16)
    ext.silu_and_mul(out, gate_up)
    assert out[0, 1].isnan() and torch.isfinite(out[0, [0, 2, 3]]).all()


def _rotary_case(dt, num_tokens, num_heads, num_kv_heads, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dt)
    angles = torch.rand(50, head_dim // 2, generator=gen, dtype=torch.float64) * 6.3
    angles = torch.cat([angles, angles], dim=-1)
    sign = torch.cat([-torch.ones(head_dim // 2), torch.ones(head_dim // 2)]).double()
    cos, signed_sin = angles.cos().float(), (angles.sin() * sign).float()
    positions = torch.randint(0, 50, (num_tokens,), generator=gen)
    slots = torch.randperm(4 * 16, generator=gen)[:num_tokens]
    return qkv, cos, signed_sin, positions, slots


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (4, 4, 80), (2, 1, 128)])
def test_rotary_and_cache(ext, dtype, num_heads, num_kv_heads, head_dim):
    dt = DTYPES[dtype]
    num_tokens = 11
    qkv, cos, signed_sin, positions, slots = _rotary_case(dt, num_tokens, num_heads, num_kv_heads, head_dim,
                                                         case_seed("rope", dtype, num_heads, head_dim))
    original = qkv.clone()
    k_cache = torch.full((4, 16, num_kv_heads, head_dim), float("nan"), dtype=dt)
    v_cache = torch.full_like(k_cache, float("nan"))
    ext.rotary_and_cache(qkv, positions, cos, signed_sin, slots, k_cache, v_cache, num_heads, num_kv_heads)
    heads = num_heads + num_kv_heads
    x = original[:, :heads * head_dim].double().view(num_tokens, heads, head_dim)
    c, s = cos.double()[positions][:, None], signed_sin.double()[positions][:, None]
    ref = x * c + x.roll(head_dim // 2, dims=-1) * s
    got = qkv[:, :heads * head_dim].view(num_tokens, heads, head_dim)
    # float32: one product and one fused multiply-add, each within an ulp of the larger term.
    scale = x.abs() * c.abs() + x.roll(head_dim // 2, dims=-1).abs() * s.abs()
    bound = bound_for(ref, dt, 0) if dt != torch.float32 else 2 * ulp(scale, torch.float32)
    assert_within(got, ref, bound)
    assert torch.equal(qkv[:, heads * head_dim:], original[:, heads * head_dim:]), "v must not change"
    k_rows = k_cache.view(-1, num_kv_heads, head_dim)
    v_rows = v_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(k_rows[slots], got[:, num_heads:])
    assert torch.equal(v_rows[slots], original[:, heads * head_dim:].view(num_tokens, num_kv_heads, head_dim))
    untouched = torch.ones(k_rows.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert k_rows[untouched].isnan().all() and v_rows[untouched].isnan().all(), "wrote outside its slots"


def test_rows_do_not_depend_on_the_batch(ext):
    """Batch invariance: a row's result is the same alone and inside a batch split over threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, residual = randn((200, 576), torch.bfloat16, 1), randn((200, 576), torch.bfloat16, 2)
        weight = randn((576,), torch.bfloat16, 3)
        _, batched = fused.rms_norm(x, weight, 1e-5, residual)
        gate_up = randn((200, 2 * 1536), torch.bfloat16, 4)
        silu_batched = fused.silu_and_mul(gate_up)
        for row in (0, 77, 199):
            _, alone = fused.rms_norm(x[row:row + 1], weight, 1e-5, residual[row:row + 1])
            assert torch.equal(alone[0], batched[row])
            assert torch.equal(fused.silu_and_mul(gate_up[row:row + 1])[0], silu_batched[row])
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_routes_agree(ext, dtype):
    """The C++ route and the torch twin (what backend="torch", float64 and CUDA take) agree to the
    16-bit bound: the twin rounds after each of its ops, the kernel once."""
    dt = DTYPES[dtype]
    x, residual, weight = randn((5, 96), dt, 5), randn((5, 96), dt, 6), randn((96,), dt, 7)
    (h1, n1), (h2, n2) = fused.rms_norm(x, weight, 1e-5, residual), fused.rms_norm(x, weight, 1e-5, residual,
                                                                                   backend="torch")
    assert torch.equal(h1, h2)
    assert ((n1.double() - n2.double()).abs() <= 2 * ulp(n2.double(), dt)).all()
    gate_up = randn((5, 192), dt, 8)
    s1, s2 = fused.silu_and_mul(gate_up), fused.silu_and_mul(gate_up, backend="torch")
    assert ((s1.double() - s2.double()).abs() <= 2 * ulp(s2.double(), dt) + 1e-30).all()

    num_heads, num_kv_heads, head_dim = 6, 2, 32
    qkv, cos, signed_sin, positions, slots = _rotary_case(dt, 7, num_heads, num_kv_heads, head_dim, 9)
    rope = fused.RopeStep(positions, cos, signed_sin, dt)
    plan = plan_attention(torch.zeros(1, 1, dtype=torch.int32), [1], [0, 1], 16)
    caches = [torch.zeros(4, 16, num_kv_heads, head_dim, dtype=dt) for _ in range(4)]
    q1 = fused.rotary_and_cache(qkv.clone(), rope, num_heads, num_kv_heads, head_dim, caches[0], caches[1], slots,
                                plan=plan)
    q2 = fused.rotary_and_cache(qkv.clone(), rope, num_heads, num_kv_heads, head_dim, caches[2], caches[3], slots,
                                backend="torch", plan=plan)
    # The twin rounds cos and sin to the dtype, then the product, then the sum: up to four
    # roundings, each within an ulp of the larger term (x * cos or rotate_half(x) * sin).
    heads = num_heads + num_kv_heads
    x = qkv[:, :heads * head_dim].double().view(-1, heads, head_dim)[:, :num_heads]
    c, s = cos.double()[positions][:, None], signed_sin.double()[positions][:, None]
    terms = x.abs() * c.abs() + x.roll(head_dim // 2, dims=-1).abs() * s.abs()
    assert ((q1.double() - q2.double()).abs() <= 4 * ulp(terms, dt)).all()
    assert torch.equal(caches[1], caches[3])  # v rows are copied, not computed


def test_float64_takes_the_twin(ext):
    x = torch.randn(3, 16, dtype=torch.float64)
    assert cpu_ext.kernels_for(x, "auto") is None
    h, normed = fused.rms_norm(x, torch.ones(16, dtype=torch.float64), 1e-6, x)
    assert normed.dtype == torch.float64 and torch.equal(h, x + x)


def test_kernels_refuse_bad_inputs(ext):
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="weight"):
        ext.rms_norm(torch.empty_like(x), x, x, x[:0], torch.ones(16, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="float64 runs the torch twin"):
        xd = x.double()
        ext.rms_norm(torch.empty_like(xd), xd, xd, xd[:0], torch.ones(32, dtype=torch.float64), 1e-5)
    with pytest.raises(RuntimeError, match="out"):
        ext.silu_and_mul(torch.empty(4, 32, dtype=torch.bfloat16), x)
    qkv, cos, signed_sin, positions, slots = _rotary_case(torch.bfloat16, 3, 2, 1, 16, 1)
    caches = [torch.zeros(4, 16, 1, 16, dtype=torch.bfloat16) for _ in range(2)]
    with pytest.raises(RuntimeError, match="slot out of range"):
        ext.rotary_and_cache(qkv, positions, cos, signed_sin, slots + 1000, *caches, 2, 1)
    with pytest.raises(RuntimeError, match="position out of"):
        ext.rotary_and_cache(qkv, positions + 50, cos, signed_sin, slots, *caches, 2, 1)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ext.rotary_and_cache(qkv.float(), positions, cos, signed_sin, slots, *caches, 2, 1)


def test_routes_take_any_leading_shape(ext):
    """DoLa normalizes a single hidden vector; the routes flatten leading dims for the kernel."""
    x, weight = randn((576,), torch.bfloat16, 11), randn((576,), torch.bfloat16, 12)
    _, normed = fused.rms_norm(x, weight, 1e-5)
    _, rows = fused.rms_norm(x[None], weight, 1e-5)
    assert normed.shape == (576,) and torch.equal(normed, rows[0])
    gate_up = randn((2, 3, 64), torch.bfloat16, 13)
    assert torch.equal(fused.silu_and_mul(gate_up), fused.silu_and_mul(gate_up.view(6, 64)).view(2, 3, 32))


def _argmax(ext, x: torch.Tensor) -> torch.Tensor:
    out = torch.full((x.shape[0],), -7, dtype=torch.long)  # poisoned: a row never written stays -7
    ext.argmax_rows(out, x)
    return out


@pytest.mark.parametrize("cols", [1, 63, 64, 65, 49152])
def test_argmax_rows_equals_torch_argmax(ext, cols):
    """Exact, so the oracle is torch.argmax itself: random rows, rows whose maximum repeats
    (the first one wins), a row of -inf, rows with a NaN (the first NaN wins, as in torch) and
    the last element as the maximum; rows strided as a slice of wider rows."""
    gen = torch.Generator().manual_seed(case_seed("argmax", cols))
    x = torch.randn(12, cols + 5, generator=gen)[:, :cols]  # strided rows
    assert not x.is_contiguous()
    x[1] = x[1].round()  # many ties
    x[2, :] = float("-inf")
    if cols > 2:
        x[3, cols // 3] = x[3, 2 * cols // 3] = x[3].max() + 1  # a repeated maximum
        x[4, cols // 2] = float("nan")
        x[5, [cols - 2, 1]] = float("nan")
        x[5, 0] = float("inf")
    x[6, -1] = x[6].max() + 1
    assert torch.equal(_argmax(ext, x), x.argmax(-1))
    assert torch.equal(fused.argmax_rows(x), x.argmax(-1))


def test_argmax_rows_refuses_bad_inputs(ext):
    with pytest.raises(RuntimeError, match="float32"):
        ext.argmax_rows(torch.empty(2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="not empty"):
        ext.argmax_rows(torch.empty(2, dtype=torch.long), torch.zeros(2, 0))
    with pytest.raises(RuntimeError, match="int64"):
        ext.argmax_rows(torch.empty(3, dtype=torch.long), torch.zeros(2, 3))
    # The route keeps torch where the kernel does not apply (columns not contiguous, float64).
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(fused.argmax_rows(x), x.argmax(-1))
    assert torch.equal(fused.argmax_rows(x.float().t()), x.float().t().argmax(-1))
