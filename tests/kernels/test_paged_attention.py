"""Paged attention: Triton (interpreted) == torch twin == naive float64 oracle."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels.paged_attention import paged_attention_reference, paged_attention_triton
from tests.kernels.helpers import (
    DTYPES,
    TOLERANCE,
    case_seed,
    make_paged_batch,
    naive_attention,
    rel_err,
)

# (context_len, num_queries) per sequence; lengths avoid multiples of the block size.
LAYOUTS = {
    "decode": [(45, 1), (17, 1), (64, 1), (1, 1), (33, 1)],
    "prefill": [(23, 23), (40, 40)],
    # decode, full prefill, prefix hit + new tokens, decode on a block edge, a prefill chunk
    "mixed": [(37, 1), (50, 50), (70, 5), (16, 1), (29, 12)],
}
GQA = [(2, 2), (6, 2), (8, 1)]  # (num_heads, num_kv_heads): ratios 1, 3, 8
WINDOWS = [None, 8, 1000]  # none, smaller than most contexts, larger than all


def _run_triton(batch, window: int | None, **kwargs) -> torch.Tensor:
    out = torch.full_like(batch.q, float("nan"))
    result = paged_attention_triton(*batch.args(), window, out=out, **kwargs)
    assert result is out
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_triton_matches_twin_over_layouts(layout, num_heads, num_kv_heads, window, dtype):
    seed = case_seed(layout, num_heads, window, dtype)
    batch = make_paged_batch(LAYOUTS[layout], num_heads, num_kv_heads, head_dim=80,
                             block_size=16, dtype=DTYPES[dtype], seed=seed)
    expected = paged_attention_reference(*batch.args(), window)
    assert rel_err(_run_triton(batch, window), expected) <= TOLERANCE[DTYPES[dtype]]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_triton_matches_twin_over_dtypes_and_shapes(dtype, head_dim, block_size):
    batch = make_paged_batch(LAYOUTS["mixed"], 6, 2, head_dim, block_size, DTYPES[dtype],
                             seed=case_seed(dtype, head_dim, block_size))
    for window in (None, 20):
        expected = paged_attention_reference(*batch.args(), window)
        assert rel_err(_run_triton(batch, window), expected) <= TOLERANCE[DTYPES[dtype]]


def test_triton_skips_sequences_without_queries():
    seqs = [(30, 3), (25, 0), (40, 1)]
    batch = make_paged_batch(seqs, 4, 2, 64, 16, torch.float32, seed=case_seed("empty"))
    expected = paged_attention_reference(*batch.args(), None)
    assert rel_err(_run_triton(batch, None), expected) <= TOLERANCE[torch.float32]


def test_triton_accepts_strided_queries():
    # q as a view of a fused qkv projection: token stride > num_heads * head_dim.
    batch = make_paged_batch(LAYOUTS["mixed"], 4, 2, 64, 16, torch.float32,
                             seed=case_seed("strided"))
    qkv = torch.randn(batch.q.shape[0], 8, 64)
    qkv[:, :4] = batch.q
    strided = dataclasses.replace(batch, q=qkv[:, :4])
    expected = paged_attention_reference(*batch.args(), None)
    got = paged_attention_triton(*strided.args(), None)
    assert rel_err(got, expected) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_twin_matches_naive(layout, num_heads, num_kv_heads, window):
    batch = make_paged_batch(LAYOUTS[layout], num_heads, num_kv_heads, 80, 16, torch.float32,
                             seed=case_seed(layout, num_heads, window))
    got = paged_attention_reference(*batch.args(), window)
    assert rel_err(got, naive_attention(batch, window)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("window", WINDOWS)
def test_twin_matches_naive_bf16(window):
    batch = make_paged_batch(LAYOUTS["mixed"], 6, 2, 64, 32, torch.bfloat16,
                             seed=case_seed("bf16", window))
    got = paged_attention_reference(*batch.args(), window)
    assert rel_err(got, naive_attention(batch, window)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("split_k", [False, True])
def test_window_never_reads_keys_outside_it(split_k):
    # Keys older than every query's window are NaN: reading them (even times a zero
    # probability) would poison the output, so this checks the kernel skips them.
    window = 24
    seqs = [(150, 1), (97, 4), (64, 1)]
    batch = make_paged_batch(seqs, 6, 2, 64, 16, torch.float32, seed=case_seed("skip", split_k))
    block_size = batch.k_cache.shape[1]
    for b, (ctx, num_queries) in enumerate(seqs):
        for j in range(ctx - num_queries - window + 1):
            block = batch.block_tables[b, j // block_size]
            batch.k_cache[block, j % block_size] = float("nan")
            batch.v_cache[block, j % block_size] = float("nan")
    out = torch.full_like(batch.q, float("nan"))
    got = paged_attention_triton(*batch.args(), window, split_k=split_k, partition_size=32,
                                 out=out)
    assert rel_err(got, naive_attention(batch, window)) <= TOLERANCE[torch.float32]
