"""reshape_and_cache: Triton (interpreted) == torch twin, padding slots (< 0) skipped."""
from __future__ import annotations

import pytest
import torch

from kernels.reshape_and_cache import reshape_and_cache_reference, reshape_and_cache_triton
from tests.kernels.helpers import DTYPES, case_seed


def _write_both(key: torch.Tensor, value: torch.Tensor, shape: tuple[int, ...],
                cache_dtype: torch.dtype, slots: torch.Tensor) -> dict[str, tuple]:
    """Run twin and Triton into NaN-poisoned caches; returns {name: (k_cache, v_cache)}."""
    caches = {}
    for name, fn in (("twin", reshape_and_cache_reference), ("triton", reshape_and_cache_triton)):
        k_cache = torch.full(shape, float("nan"), dtype=cache_dtype)
        v_cache = torch.full(shape, float("nan"), dtype=cache_dtype)
        fn(key, value, k_cache, v_cache, slots)
        caches[name] = (k_cache, v_cache)
    return caches


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (3, 80), (8, 128)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_triton_matches_twin(block_size, num_kv_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(case_seed(block_size, num_kv_heads, dtype))
    num_blocks, num_tokens = 6, 37
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # Tokens go to distinct random slots; every fifth is padding (-1 or another negative).
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::5] = -1
    slots[3] = -7
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DTYPES[dtype])
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DTYPES[dtype])
    caches = _write_both(key, value, shape, DTYPES[dtype], slots)
    for got, expected in zip(caches["triton"], caches["twin"]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    written = caches["triton"][0].view(-1, num_kv_heads, head_dim)[slots[slots >= 0]]
    assert torch.isfinite(written).all()
    assert caches["triton"][0].isnan().any()  # untouched slots stay poisoned


def test_casts_to_cache_dtype():
    gen = torch.Generator().manual_seed(case_seed("cast"))
    key = torch.randn(9, 2, 64, generator=gen)
    value = torch.randn(9, 2, 64, generator=gen)
    slots = torch.tensor([3, -1, 0, 40, 12, 7, -2, 63, 21])
    caches = _write_both(key, value, (4, 16, 2, 64), torch.bfloat16, slots)
    # NOTE: the interpreter truncates float32 -> bfloat16 where CUDA rounds to nearest,
    # so allow one bfloat16 ulp.
    for got, expected in zip(caches["triton"], caches["twin"]):
        torch.testing.assert_close(got, expected, rtol=2**-7, atol=0, equal_nan=True)


def test_strided_key_value_and_int32_slots():
    gen = torch.Generator().manual_seed(case_seed("strided"))
    qkv = torch.randn(10, 3, 2, 64, generator=gen)  # fused projection: views with gaps
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([5, -1, 17, 0, 31, 8, -1, 2, 20, 9], dtype=torch.int32)
    caches = []
    for fn in (reshape_and_cache_reference, reshape_and_cache_triton):
        k_cache = torch.full((2, 16, 2, 64), float("nan"))
        v_cache = torch.full((2, 16, 2, 64), float("nan"))
        fn(key, value, k_cache, v_cache, slots)
        caches.append((k_cache, v_cache))
    for got, expected in zip(caches[1], caches[0]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
