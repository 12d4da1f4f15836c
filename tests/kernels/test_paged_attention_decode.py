"""Split-K (flash-decoding) paged attention: forced on == torch twin; the auto policy."""
from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import paged_attention_reference, paged_attention_triton
from kernels.paged_attention_decode import should_split_k
from tests.kernels.helpers import DTYPES, TOLERANCE, case_seed, make_paged_batch, rel_err

# Contexts span 0..5 partitions of 64 keys, including a 1-token context and exact edges.
DECODE = [(300, 1), (97, 1), (256, 1), (1, 1), (64, 1), (5, 1)]
PARTITION = 64


def _split_k(batch, window: int | None) -> torch.Tensor:
    out = torch.full_like(batch.q, float("nan"))
    return paged_attention_triton(*batch.args(), window, split_k=True,
                                  partition_size=PARTITION, out=out)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 50, 100_000])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (6, 2), (8, 1)])
def test_split_k_decode_matches_twin(num_heads, num_kv_heads, window, dtype):
    batch = make_paged_batch(DECODE, num_heads, num_kv_heads, 64, 32, DTYPES[dtype],
                             seed=case_seed(num_heads, window, dtype))
    expected = paged_attention_reference(*batch.args(), window)
    assert rel_err(_split_k(batch, window), expected) <= TOLERANCE[DTYPES[dtype]]


@pytest.mark.parametrize("head_dim,block_size", [(80, 16), (96, 32), (128, 32)])
def test_split_k_head_dims_and_block_sizes(head_dim, block_size):
    batch = make_paged_batch(DECODE, 6, 2, head_dim, block_size, torch.float32,
                             seed=case_seed(head_dim, block_size))
    expected = paged_attention_reference(*batch.args(), 70)
    assert rel_err(_split_k(batch, 70), expected) <= TOLERANCE[torch.float32]


def test_split_k_on_mixed_batch_matches_twin():
    # Split-K is only chosen automatically for decode, but stays correct for any batch.
    seqs = [(130, 1), (90, 90), (200, 7), (40, 1)]
    batch = make_paged_batch(seqs, 6, 2, 64, 16, torch.float32, seed=case_seed("mixed"))
    for window in (None, 33):
        expected = paged_attention_reference(*batch.args(), window)
        assert rel_err(_split_k(batch, window), expected) <= TOLERANCE[torch.float32]


def test_split_k_auto_policy():
    cpu = torch.device("cpu")
    assert should_split_k(cpu, True, num_programs=8, context_bound=8192, partition_size=512)
    assert not should_split_k(cpu, False, num_programs=8, context_bound=8192,
                              partition_size=512)
    assert not should_split_k(cpu, True, num_programs=8, context_bound=600,
                              partition_size=512)
    assert not should_split_k(cpu, True, num_programs=512, context_bound=8192,
                              partition_size=512)


def test_auto_split_k_long_decode_matches_twin():
    batch = make_paged_batch([(1100, 1), (700, 1)], 4, 1, 64, 32, torch.float32,
                             seed=case_seed("auto"))
    got = paged_attention_triton(*batch.args(), None)  # 1 KV head x 2 seqs: splits
    expected = paged_attention_reference(*batch.args(), None)
    assert rel_err(got, expected) <= TOLERANCE[torch.float32]


def test_partition_size_must_be_a_tile_multiple():
    batch = make_paged_batch(DECODE, 2, 2, 64, 16, torch.float32, seed=case_seed("bad"))
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_triton(*batch.args(), None, split_k=True, partition_size=48)
