"""The planned CPU attention path == the float64 naive oracle (and so the twin), over layouts.

Caches come from make_paged_batch: block 0 and every slot past a context hold NaN, so a
path that reads a key it should not (padding, a window's outside, the null block) fails.
"""
from __future__ import annotations

import pytest
import torch

from kernels import dispatch
from kernels.paged_attention import paged_attention_reference
from kernels.paged_attention_cpu import paged_attention_cpu, plan_attention
from tests.kernels.helpers import DTYPES, TOLERANCE, case_seed, make_paged_batch, naive_attention, rel_err
from tests.kernels.test_paged_attention import GQA, LAYOUTS, WINDOWS

LAYOUTS_CPU = {
    **LAYOUTS,
    "one_decode": [(77, 1)],
    "one_prefill": [(33, 33)],
    # a sequence that feeds no query this step sits between two that do
    "idle_row": [(20, 1), (35, 0), (18, 4)],
}


def _plan(batch):
    return plan_attention(batch.block_tables, batch.seq_lens.tolist(), batch.query_start_locs.tolist(),
                          batch.k_cache.shape[1])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("layout", list(LAYOUTS_CPU))
def test_planned_path_matches_naive(layout, num_heads, num_kv_heads, window, dtype):
    batch = make_paged_batch(LAYOUTS_CPU[layout], num_heads, num_kv_heads, head_dim=64, block_size=16,
                             dtype=DTYPES[dtype], seed=case_seed("cpu", layout, num_heads, window, dtype))
    got = paged_attention_cpu(batch.q, batch.k_cache, batch.v_cache, _plan(batch), batch.scale, window)
    assert got.dtype == batch.q.dtype and got.shape == batch.q.shape
    rows = [t for (ctx, nq), start in zip(batch.seqs, batch.query_start_locs.tolist()) for t in range(start, start + nq)]
    assert rel_err(got[rows], naive_attention(batch, window)[rows]) <= TOLERANCE[DTYPES[dtype]]


def test_plan_is_shared_by_layers_with_different_windows():
    """One plan serves every layer: masks are per window, so a window layer after a full one
    (Qwen2/Mistral mix them) must not reuse the full layer's mask."""
    batch = make_paged_batch(LAYOUTS["mixed"], 6, 2, 64, 16, torch.float32, seed=7)
    plan = _plan(batch)
    for window in (None, 8, None, 8):
        got = paged_attention_cpu(batch.q, batch.k_cache, batch.v_cache, plan, batch.scale, window)
        assert rel_err(got, naive_attention(batch, window)) <= TOLERANCE[torch.float32]


def test_dispatch_takes_the_planned_path_only_with_a_plan():
    batch = make_paged_batch(LAYOUTS["decode"], 6, 2, 64, 16, torch.float32, seed=3)
    planned = dispatch.paged_attention(*batch.args(), None, backend="torch", plan=_plan(batch))
    twin = dispatch.paged_attention(*batch.args(), None, backend="torch")
    assert torch.equal(twin, paged_attention_reference(*batch.args(), None))
    assert rel_err(planned, twin) <= TOLERANCE[torch.float32]


def test_write_cache_equals_the_twin_and_touches_only_its_slots():
    from kernels.paged_attention_cpu import write_cache
    from kernels.reshape_and_cache import reshape_and_cache_reference

    gen = torch.Generator().manual_seed(5)
    key, value = torch.randn(2, 6, 2, 64, generator=gen).unbind(0)
    slots = torch.tensor([3, 17, 18, 40, 41, 63])
    caches = [torch.full((4, 16, 2, 64), float("nan")) for _ in range(4)]
    write_cache(key, value, caches[0], caches[1], slots)
    reshape_and_cache_reference(key, value, caches[2], caches[3], slots)
    for ours, twin in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(ours.nan_to_num(7.0), twin.nan_to_num(7.0))
    assert int(torch.isfinite(caches[0]).all(-1).all(-1).sum()) == len(slots)
