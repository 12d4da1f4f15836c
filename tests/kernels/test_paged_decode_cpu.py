"""The C++ single-query CPU kernel (kernels/csrc/paged_decode_cpu.cpp) == the float64 oracle.

Caches come from make_paged_batch: block 0 and every slot past a context hold NaN, so a
kernel that reads a key it should not (padding, a window's outside, the null block) fails;
its output is NaN-poisoned first, so a row or head it never writes fails too. Where the CPU has
AVX-512 the kernel takes its intrinsics path (head_dim a multiple of 16); `portable=True` forces
the plain loops, so both are checked on such a machine (elsewhere both calls run the loops).
"""
from __future__ import annotations

import pytest
import torch

from kernels.paged_attention_cpu import paged_attention_cpu, plan_attention
from tests.kernels.helpers import DTYPES, TOLERANCE, case_seed, make_paged_batch, naive_attention, rel_err
from tests.kernels.test_paged_attention import GQA, WINDOWS

DECODE_LAYOUTS = {
    "one": [(77, 1)],
    "ragged": [(1, 1), (16, 1), (17, 1), (45, 1), (130, 1)],  # block edges and a one-key context
    "batch": [(200 - 7 * i, 1) for i in range(12)],
}


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (80, 32), (128, 16)])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("layout", list(DECODE_LAYOUTS))
@pytest.mark.parametrize("portable", [False, True], ids=["fast", "portable"])
def test_kernel_matches_naive(ext, portable, layout, num_heads, num_kv_heads, window, head_dim, block_size, dtype):
    batch = make_paged_batch(DECODE_LAYOUTS[layout], num_heads, num_kv_heads, head_dim, block_size,
                             DTYPES[dtype], seed=case_seed("decode-cpu", layout, num_heads, window, head_dim, dtype))
    out = torch.full(batch.q.shape, float("nan"), dtype=batch.q.dtype)
    ext.paged_decode_attention(out, batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                               batch.scale, window or 0, portable=portable)
    assert rel_err(out, naive_attention(batch, window)) <= TOLERANCE[DTYPES[dtype]]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_planned_path_gives_the_same_answer_with_and_without_the_kernel(ext, dtype):
    """Mixed steps (decode rows between prefill rows) route their decode rows to the kernel."""
    seqs = [(40, 1), (33, 33), (90, 1), (25, 5), (7, 1)]
    batch = make_paged_batch(seqs, 6, 2, 64, 16, DTYPES[dtype], seed=case_seed("route", dtype))
    plan = plan_attention(batch.block_tables, batch.seq_lens.tolist(), batch.query_start_locs.tolist(), 16)
    with_kernel = paged_attention_cpu(batch.q, batch.k_cache, batch.v_cache, plan, batch.scale, use_kernel=True)
    torch_route = paged_attention_cpu(batch.q, batch.k_cache, batch.v_cache, plan, batch.scale, use_kernel=False)
    oracle = naive_attention(batch, None)
    for got in (with_kernel, torch_route):
        assert rel_err(got, oracle) <= TOLERANCE[DTYPES[dtype]]


def test_kernel_refuses_bad_inputs(ext):
    batch = make_paged_batch(DECODE_LAYOUTS["one"], 6, 2, 64, 16, torch.bfloat16, seed=1)
    args = (batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale, 0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ext.paged_decode_attention(batch.q.float(), batch.q.float(), *args)
    with pytest.raises(RuntimeError, match="int32"):
        ext.paged_decode_attention(torch.empty_like(batch.q), batch.q, batch.k_cache, batch.v_cache,
                                   batch.block_tables.long(), batch.seq_lens, batch.scale, 0)
    with pytest.raises(RuntimeError, match="out must be"):
        ext.paged_decode_attention(torch.empty(1, 6, 32, dtype=torch.bfloat16), batch.q, *args)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("portable", [False, True], ids=["fast", "portable"])
def test_kernel_reads_q_as_a_view_of_the_qkv_rows(ext, portable, dtype):
    """On the engine's route q is a view of the qkv projection (rows wider than heads x dim)."""
    batch = make_paged_batch(DECODE_LAYOUTS["batch"], 6, 2, 64, 16, DTYPES[dtype], seed=case_seed("strided", dtype))
    rows = torch.full((batch.q.shape[0], 10 * 64), float("nan"), dtype=batch.q.dtype)
    rows[:, :6 * 64] = batch.q.reshape(batch.q.shape[0], -1)
    q_view = rows[:, :6 * 64].view(-1, 6, 64)
    assert not q_view.is_contiguous()
    out = torch.full(batch.q.shape, float("nan"), dtype=batch.q.dtype)
    ext.paged_decode_attention(out, q_view, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                               batch.scale, 0, portable=portable)
    assert rel_err(out, naive_attention(batch, None)) <= TOLERANCE[DTYPES[dtype]]
