"""The C++ multi-query CPU kernel (kernels/csrc/paged_prefill_cpu.cpp) == the float64 oracle.

Caches come from make_paged_batch: block 0 and every slot past a context hold NaN, so a kernel
that reads a key it should not fails; its output is NaN-poisoned first, so a row or head it
never writes fails too, and decode rows (not its work) must stay untouched.

Bound, from the numerics: q, k and v are bf16 already, so the scores are exact products summed
in float32; the one coarse step is each softmax weight rounded to bf16 before P V (relative
error u = 2^-8 at most, the weights summing to what was multiplied), which moves an output by
at most u * max|v|; the output's own rounding adds u * |out|. The float32 sums and the
polynomial exp (2 ulp of float32) are orders of magnitude below that.
"""
from __future__ import annotations

import pytest
import torch

from kernels import cpu_ext
from kernels.paged_attention_cpu import paged_attention_cpu, plan_attention
from server.models.linear import cpu_flags
from tests.kernels.helpers import case_seed, make_paged_batch, naive_attention
from tests.kernels.test_paged_attention import GQA, WINDOWS

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8}
BUDGET = 64 << 20
PREFILL_LAYOUTS = {
    "prompt": [(158, 158)],
    "tile_edges": [(64, 64), (65, 65), (128, 2), (2, 2)],  # key tiles of 64, the smallest prefill
    "chunk_on_history": [(200, 40), (97, 33)],  # chunked prefill / prefix-cache hit
    "mixed_with_decode": [(40, 1), (33, 33), (90, 1), (25, 5), (7, 1)],
    "long": [(300, 300)],  # several query tiles (32) and key tiles (64)
}


def _supported(ext, dtype: torch.dtype) -> None:
    if not ext.paged_prefill_supported(dtype):
        pytest.skip(f"no packed brgemm for {dtype} on this CPU (the SDPA route runs instead)")


def _bound(batch, oracle: torch.Tensor) -> float:
    u = UNIT_ROUNDOFF[batch.q.dtype]
    values = batch.v_cache.double().nan_to_num(0.0).abs().max().item()
    return u * values + u * oracle.abs().max().item()


def _multi_rows(batch) -> torch.Tensor:
    starts = batch.query_start_locs.tolist()
    rows = [torch.arange(a, b) for a, b in zip(starts, starts[1:]) if b - a >= 2]
    return torch.cat(rows)


def _run(ext, batch, window, q=None, budget=BUDGET) -> torch.Tensor:
    out = torch.full(batch.q.shape, float("nan"), dtype=batch.q.dtype)
    ext.paged_prefill_attention(out, batch.q if q is None else q, batch.k_cache, batch.v_cache, batch.block_tables,
                                batch.seq_lens, batch.query_start_locs, batch.scale, window or 0, budget)
    return out


@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (80, 32), (128, 16)])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("layout", list(PREFILL_LAYOUTS))
def test_kernel_matches_naive(ext, layout, num_heads, num_kv_heads, window, head_dim, block_size):
    _supported(ext, torch.bfloat16)
    batch = make_paged_batch(PREFILL_LAYOUTS[layout], num_heads, num_kv_heads, head_dim, block_size, torch.bfloat16,
                             seed=case_seed("prefill-cpu", layout, num_heads, window, head_dim))
    out = _run(ext, batch, window)
    oracle = naive_attention(batch, window)
    rows = _multi_rows(batch)
    err = (out[rows].double() - oracle[rows]).abs().max().item()
    assert err <= _bound(batch, oracle[rows])  # NaN (a row or head not written) fails here too
    decode = torch.ones(batch.q.shape[0], dtype=torch.bool)
    decode[rows] = False
    assert out[decode].isnan().all(), "the kernel wrote rows of one-query sequences"


def test_rounds_under_a_small_pack_budget_give_the_same_output(ext):
    """A budget below one sequence's packed tiles: one sequence per round, bit for bit the same."""
    _supported(ext, torch.bfloat16)
    batch = make_paged_batch([(150, 150), (70, 20), (9, 1), (130, 64)], 6, 2, 64, 16, torch.bfloat16,
                             seed=case_seed("rounds"))
    assert torch.equal(_run(ext, batch, None, budget=1).nan_to_num(7.0), _run(ext, batch, None).nan_to_num(7.0))


def test_kernel_reads_q_as_a_view_of_the_qkv_rows(ext):
    """On the engine's route q is a view of the qkv projection (rows wider than heads x dim)."""
    _supported(ext, torch.bfloat16)
    batch = make_paged_batch(PREFILL_LAYOUTS["chunk_on_history"], 6, 2, 64, 16, torch.bfloat16,
                             seed=case_seed("prefill-strided"))
    rows = torch.full((batch.q.shape[0], 10 * 64), float("nan"), dtype=batch.q.dtype)
    rows[:, :6 * 64] = batch.q.reshape(batch.q.shape[0], -1)
    q_view = rows[:, :6 * 64].view(-1, 6, 64)
    assert not q_view.is_contiguous()
    oracle = naive_attention(batch, None)
    assert (_run(ext, batch, None, q=q_view).double() - oracle).abs().max().item() <= _bound(batch, oracle)


def test_planned_path_routes_prefill_rows_to_the_kernel(ext):
    """paged_attention_cpu: the kernel's and the SDPA route's outputs both meet the oracle, on a
    step that mixes decode rows (the decode kernel) with prefill and chunk rows (this one)."""
    _supported(ext, torch.bfloat16)
    batch = make_paged_batch(PREFILL_LAYOUTS["mixed_with_decode"], 6, 2, 64, 16, torch.bfloat16,
                             seed=case_seed("prefill-route"))
    plan = plan_attention(batch.block_tables, batch.seq_lens.tolist(), batch.query_start_locs.tolist(), 16)
    oracle = naive_attention(batch, 8)
    for use_kernel in (True, False):
        got = paged_attention_cpu(batch.q, batch.k_cache, batch.v_cache, plan, batch.scale, 8, use_kernel=use_kernel)
        assert (got.double() - oracle).abs().max().item() <= _bound(batch, oracle)


def test_route_is_chosen_from_the_cpu():
    """bf16 prefill takes the kernel exactly where the CPU has AMX-BF16 (oneDNN's packed tiles);
    fp16 (untested on AMX-FP16: no such machine here), float32 and float64 never do."""
    if not cpu_ext.enabled():
        pytest.skip("ALIGNSERVE_CPU_KERNELS=0")
    assert (cpu_ext.prefill_kernel_for(torch.bfloat16) is not None) == ("amx_bf16" in cpu_flags())
    assert cpu_ext.prefill_kernel_for(torch.float16) is None
    assert cpu_ext.prefill_kernel_for(torch.float32) is None
    assert cpu_ext.prefill_kernel_for(torch.float64) is None


def test_kernel_refuses_bad_inputs(ext):
    _supported(ext, torch.bfloat16)
    batch = make_paged_batch([(20, 20)], 6, 2, 64, 16, torch.bfloat16, seed=2)
    tail = (batch.block_tables, batch.seq_lens, batch.query_start_locs, batch.scale, 0, BUDGET)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ext.paged_prefill_attention(batch.q.float(), batch.q.float(), batch.k_cache, batch.v_cache, *tail)
    with pytest.raises(RuntimeError, match="int32"):
        ext.paged_prefill_attention(torch.empty_like(batch.q), batch.q, batch.k_cache, batch.v_cache,
                                    batch.block_tables.long(), *tail[1:])
    with pytest.raises(RuntimeError, match="out must be"):
        ext.paged_prefill_attention(torch.empty(1, 6, 64, dtype=torch.bfloat16), batch.q, batch.k_cache,
                                    batch.v_cache, *tail)
    too_long = torch.tensor([10 ** 6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="bad length"):
        ext.paged_prefill_attention(torch.empty_like(batch.q), batch.q, batch.k_cache, batch.v_cache,
                                    batch.block_tables, too_long, *tail[2:])
