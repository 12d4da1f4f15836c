"""KV block manager: exact block ids for allocation, prefix hits, LRU eviction, fork/CoW, truncate."""
from __future__ import annotations

import pytest

from server.engine.kv_cache import NULL_BLOCK, KVCacheManager, hash_block
from server.engine.sequence import Request, SamplingParams, Sequence


def make_seq(tokens: list[int], adapter_id: int = 0, seq_id: int = 0) -> Sequence:
    req = Request(f"r{seq_id}", list(tokens), SamplingParams(), adapter_id)
    return Sequence(seq_id, req, 0, list(tokens), len(tokens))


def compute(kv: KVCacheManager, seq: Sequence, hits: list[int] | None = None) -> None:
    """Allocate and mark all tokens computed, as a finished prefill would."""
    num_new = seq.num_tokens - seq.num_computed_tokens - len(hits or []) * kv.block_size
    assert kv.allocate_slots(seq, num_new, hits)
    seq.num_computed_tokens = seq.num_tokens
    kv.cache_computed_blocks(seq)


def test_allocation_order_and_null_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    compute(kv, seq)
    assert seq.block_table == [1, 2, 3]
    assert NULL_BLOCK not in seq.block_table
    assert kv.pool.num_free_blocks == 4
    assert kv.pool.blocks[NULL_BLOCK].ref_count == 1


def test_prefix_hit_reuses_full_blocks_and_recomputes_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_seq(list(range(12)), seq_id=1)
    compute(kv, a)
    assert a.block_table == [1, 2, 3]
    b = make_seq(list(range(12)), seq_id=2)
    hits = kv.match_prefix(b)
    # 12 tokens = 3 full blocks, but the last token must be recomputed: 2 hits only.
    assert hits == [1, 2]
    compute(kv, b, hits)
    assert b.block_table[:2] == [1, 2] and b.block_table[2] not in (1, 2, 3)
    assert kv.pool.blocks[1].ref_count == 2
    c = make_seq(list(range(8)) + [99, 98, 97], seq_id=3)
    assert kv.match_prefix(c) == [1, 2]


def test_prefix_keys_are_namespaced_by_adapter():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    compute(kv, make_seq(list(range(9)), adapter_id=0, seq_id=1))
    assert kv.match_prefix(make_seq(list(range(9)), adapter_id=3, seq_id=2)) == []
    assert hash_block(None, [1, 2], 0) != hash_block(None, [1, 2], 1)


def test_freed_cached_blocks_stay_reusable_and_evict_lru():
    kv = KVCacheManager(num_blocks=6, block_size=2)  # 5 usable blocks
    a = make_seq([1, 2, 3, 4, 5], seq_id=1)
    compute(kv, a)  # blocks 1,2 full (cached), 3 partial
    kv.free(a)
    assert kv.pool.num_used_blocks == 0
    # Uncached block 3 is reused first; cached 1 and 2 survive.
    b = make_seq([7, 8], seq_id=2)
    assert kv.allocate_slots(b, 2)
    assert b.block_table == [3]
    c = make_seq([1, 2, 3, 4, 9], seq_id=3)
    assert kv.match_prefix(c) == [1, 2]
    # Exhaust the free blocks: 4, 5 then the LRU cached ones (block 2 was freed first: tail first).
    d = make_seq(list(range(100, 108)), seq_id=4)
    assert kv.allocate_slots(d, 8)
    assert d.block_table == [4, 5, 2, 1]
    assert kv.match_prefix(c) == []
    e = make_seq([50, 51], seq_id=5)
    assert not kv.allocate_slots(e, 2)


def test_fork_shares_blocks_and_copies_on_write():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    parent = make_seq(list(range(6)), seq_id=1)
    compute(kv, parent)  # [1 full, 2 partial]
    child = make_seq(list(range(6)), seq_id=2)
    kv.fork(parent, child)
    assert child.block_table == [1, 2]
    assert kv.pool.blocks[2].ref_count == 2
    # Each appends a token; the child writes first into the shared partial block -> copy.
    child.token_ids.append(42)
    assert kv.allocate_slots(child, 1)
    assert child.block_table == [1, 3]
    assert kv.take_copies() == [(2, 3)]
    parent.token_ids.append(43)
    assert kv.allocate_slots(parent, 1)
    assert parent.block_table == [1, 2]  # now sole owner: writes in place
    assert kv.take_copies() == []
    kv.free(parent)
    kv.free(child)
    assert kv.pool.num_used_blocks == 0


def test_truncate_releases_blocks_and_protects_cached_tail():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    seq = make_seq(list(range(14)), seq_id=1)
    compute(kv, seq)
    assert seq.block_table == [1, 2, 3, 4]
    kv.truncate(seq, 6)
    assert seq.block_table == [1, 2]
    assert seq.num_tokens == 6 and seq.num_computed_tokens == 6
    assert kv.pool.blocks[3].ref_count == 0 and kv.pool.blocks[4].ref_count == 0
    # Block 2 was full and cached; writing position 6 into it must copy, not clobber the cache.
    seq.token_ids.append(77)
    assert kv.allocate_slots(seq, 1)
    assert seq.block_table[1] != 2
    src, dst = kv.take_copies()[0]
    assert src == 2 and dst == seq.block_table[1]
    other = make_seq(list(range(9)), seq_id=2)
    assert kv.match_prefix(other) == [1, 2]
    with pytest.raises(ValueError):
        kv.truncate(seq, 100)


def test_refcounts_return_to_zero_after_many_forks():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    root = make_seq(list(range(10)), seq_id=0)
    compute(kv, root)
    children = []
    for i in range(5):
        c = make_seq(list(range(10)), seq_id=i + 1)
        kv.fork(root, c)
        c.token_ids.append(i)
        assert kv.allocate_slots(c, 1)
        children.append(c)
    for s in [root, *children]:
        kv.free(s)
    assert kv.pool.num_used_blocks == 0
    assert all(b.ref_count == 0 for b in kv.pool.blocks[1:])


def test_sliding_window_bounds_blocks_held():
    window, bs = 20, 4
    kv = KVCacheManager(num_blocks=64, block_size=bs, sliding_window=window)
    seq = make_seq(list(range(5)))
    compute(kv, seq)
    bound = -(-window // bs) + 1
    for t in range(200):
        seq.token_ids.append(t)
        assert kv.allocate_slots(seq, 1)
        seq.num_computed_tokens += 1
        kv.cache_computed_blocks(seq)
        held = [b for b in seq.block_table if b != NULL_BLOCK]
        assert len(held) <= bound
        # Every position the newest query can see still has its block.
        first_visible = seq.num_computed_tokens - 1 - window + 1
        assert all(b != NULL_BLOCK for b in seq.block_table[max(0, first_visible) // bs:])
    assert kv.pool.num_used_blocks == len([b for b in seq.block_table if b != NULL_BLOCK])
    kv.free(seq)
    assert kv.pool.num_used_blocks == 0


def test_rewind_behind_released_window_recomputes():
    kv = KVCacheManager(num_blocks=64, block_size=4, sliding_window=8)
    seq = make_seq(list(range(40)))
    compute(kv, seq)
    seq.token_ids.append(1)
    assert kv.allocate_slots(seq, 1)
    assert seq.block_table[0] == NULL_BLOCK
    kv.truncate(seq, 10)
    assert seq.num_computed_tokens == 0 and seq.block_table == []
    assert kv.pool.num_used_blocks == 0
