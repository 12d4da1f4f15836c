"""Paged KV block manager: refcounted blocks, prefix caching, fork (CoW) and truncate (rewind).

Owns block ids only; the tensors live in the runner. Layout per layer is
`[num_blocks, block_size, num_kv_heads, head_dim]`.

NOTE: block 0 is the reserved null block (padding of block tables); it is never
allocated and never freed.
NOTE: a block is written only while its refcount is 1 and it is not in the prefix
cache; any other write goes to a fresh copy (copy-on-write), recorded for the runner.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from server.engine.sequence import Sequence

NULL_BLOCK = 0


def hash_block(parent: bytes | None, token_ids: list[int] | tuple[int, ...], adapter_id: int) -> bytes:
    """Chained content hash of one full block; the adapter id namespaces KV per adapter."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(adapter_id.to_bytes(8, "little", signed=True))
    h.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    return h.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


class BlockPool:
    """Blocks, their refcounts, the free queue (LRU order) and the hash -> block map."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError("need at least 2 KV blocks (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.blocks[NULL_BLOCK].ref_count = 1  # pinned forever
        # Front = next to be reused. Cached blocks queue at the back so they survive longest.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by live sequences (excludes the null block and free cached blocks)."""
        return self.num_blocks - 1 - len(self.free_queue)

    def allocate(self) -> int:
        """Take the least recently freed block, evicting its cached hash if any."""
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            del self.cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def acquire(self, block_id: int) -> None:
        """Add a reference (fork or prefix hit); a free cached block leaves the free queue."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block_id != NULL_BLOCK and block.ref_count > 0, f"bad release of block {block_id}"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block_id] = None
            if block.block_hash is None:
                # Uncached blocks hold nothing reusable: hand them out first.
                self.free_queue.move_to_end(block_id, last=False)

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def register(self, block_id: int, block_hash: bytes) -> None:
        """Publish a full block for prefix reuse (first writer wins on duplicates)."""
        block = self.blocks[block_id]
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block_id

    def is_writable(self, block_id: int) -> bool:
        block = self.blocks[block_id]
        return block.ref_count == 1 and block.block_hash is None


class KVCacheManager:
    """Allocates, shares and releases KV blocks for sequences."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Set only when every layer is windowed: then blocks behind the window are dropped.
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks)
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst), drained by the scheduler

    # ---- hashing -----------------------------------------------------------------
    def update_block_hashes(self, seq: Sequence) -> None:
        """Extend the sequence's chained hashes to every full block of its tokens."""
        bs = self.block_size
        while (len(seq.block_hashes) + 1) * bs <= seq.num_tokens:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else None
            seq.block_hashes.append(hash_block(parent, seq.token_ids[i * bs:(i + 1) * bs], seq.adapter_id))

    # ---- allocation ----------------------------------------------------------------
    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks covering the longest hashed prefix of the sequence.

        NOTE: at most num_tokens - 1 tokens are taken from the cache, so the last token is
        always computed and yields logits.
        """
        if not self.enable_prefix_caching or seq.params.prompt_taps:
            # Prompt taps need every prompt position computed (vLLM does the same for
            # prompt logprobs); the blocks it fills are still published for others.
            return []
        self.update_block_hashes(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, prefix_hits: list[int] | None = None) -> bool:
        """Make room for `num_new_tokens` after `seq.num_computed_tokens`; False if out of blocks.

        On success, prefix hits (waiting sequences only) become part of the table and
        `num_computed_tokens` advances past them; the caller then computes the new tokens.
        """
        prefix_hits = prefix_hits or []
        bs = self.block_size
        self.release_out_of_window(seq)
        num_computed = seq.num_computed_tokens + len(prefix_hits) * bs
        num_needed = self.num_blocks_needed(num_computed + num_new_tokens)
        num_have = len(seq.block_table) + len(prefix_hits)
        num_fresh = max(0, num_needed - num_have)
        # A write into an existing partial block that is shared or cached needs a private copy.
        first_write_block = num_computed // bs
        needs_copy = (num_new_tokens > 0 and first_write_block < len(seq.block_table)
                      and not self.pool.is_writable(seq.block_table[first_write_block]))
        num_hits_free = sum(1 for b in prefix_hits if self.pool.blocks[b].ref_count == 0)
        if num_fresh + int(needs_copy) + num_hits_free > self.pool.num_free_blocks:
            return False
        for block_id in prefix_hits:
            self.pool.acquire(block_id)
        seq.block_table.extend(prefix_hits)
        seq.num_computed_tokens = num_computed
        seq.num_cached_blocks = max(seq.num_cached_blocks, len(seq.block_table))
        if needs_copy:
            src = seq.block_table[first_write_block]
            dst = self.pool.allocate()
            self.pending_copies.append((src, dst))
            seq.block_table[first_write_block] = dst
            self.pool.release(src)
        for _ in range(num_fresh):
            seq.block_table.append(self.pool.allocate())
        return True

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the sequence's fully computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        self.update_block_hashes(seq)
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes))
        for i in range(seq.num_cached_blocks, num_full):
            if seq.block_table[i] != NULL_BLOCK:
                self.pool.register(seq.block_table[i], seq.block_hashes[i])
        seq.num_cached_blocks = max(seq.num_cached_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Drop all of the sequence's references (tail first, so its tail is evicted first)."""
        for block_id in reversed(seq.block_table):
            if block_id != NULL_BLOCK:
                self.pool.release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0

    # ---- primitives for test-time methods -----------------------------------------
    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share all of the parent's blocks with the child; the first write copies (CoW)."""
        for block_id in parent.block_table:
            if block_id != NULL_BLOCK:
                self.pool.acquire(block_id)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_blocks = parent.num_cached_blocks

    def truncate(self, seq: Sequence, new_len: int) -> None:
        """Rewind to `new_len` tokens, releasing blocks wholly past it.

        The block holding position new_len (if partial) is kept; its next write copies it
        when it is shared or cached, so other sequences never see the rewind.
        """
        if new_len > seq.num_tokens:
            raise ValueError(f"truncate to {new_len} > length {seq.num_tokens}")
        keep = self.num_blocks_needed(new_len)
        for block_id in reversed(seq.block_table[keep:]):
            if block_id != NULL_BLOCK:
                self.pool.release(block_id)
        del seq.block_table[keep:]
        del seq.token_ids[new_len:]
        del seq.block_hashes[new_len // self.block_size:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, new_len)
        seq.num_cached_blocks = min(seq.num_cached_blocks, new_len // self.block_size)
        num_released = next((i for i, b in enumerate(seq.block_table) if b != NULL_BLOCK), len(seq.block_table))
        if num_released > self._first_needed_block(seq):
            # Rewound into a window whose blocks are already gone: recompute from the start.
            self.free(seq)

    # ---- sliding window ------------------------------------------------------------
    def _first_needed_block(self, seq: Sequence) -> int:
        """Index of the first block the next query (at num_computed_tokens) can still see."""
        if self.sliding_window is None:
            return 0
        first_visible = seq.num_computed_tokens - self.sliding_window + 1
        return max(0, first_visible) // self.block_size

    def release_out_of_window(self, seq: Sequence) -> None:
        """Swap blocks wholly behind every layer's window for the null block.

        NOTE: the window only moves forward, so released blocks are never read again;
        cached ones stay reusable by other sequences' prefix hits.
        """
        for i in range(min(self._first_needed_block(seq), len(seq.block_table))):
            if seq.block_table[i] != NULL_BLOCK:
                self.pool.release(seq.block_table[i])
                seq.block_table[i] = NULL_BLOCK

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    @property
    def usage(self) -> float:
        return self.pool.num_used_blocks / max(1, self.pool.num_blocks - 1)
