"""Shared builders for kernel tests: random paged batches, a naive float64 oracle, rel. error."""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def case_seed(*parts: object) -> int:
    """A seed that differs per test case yet is stable across runs (unlike hash())."""
    return zlib.crc32(repr(parts).encode())


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|a - b| / max|b| in float64; NaN anywhere in `actual` gives inf."""
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@dataclass(frozen=True)
class PagedBatch:
    """One step's inputs for paged attention, built like the engine builds them."""

    seqs: tuple[tuple[int, int], ...]  # (context_len, num_queries) per sequence
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_locs: torch.Tensor  # [num_seqs + 1] int32
    scale: float

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                self.query_start_locs, self.scale)


def make_paged_batch(
    seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, seed: int,
) -> PagedBatch:
    """Random batch over a shuffled, non-contiguous block table.

    Block 0 is reserved (as in the engine) and pads every table row; it and every cache slot
    past a sequence's context hold NaN, so a kernel reading outside the context fails.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // block_size) for ctx, _ in seqs]
    num_blocks = 1 + sum(blocks_per_seq) + 3  # + never-used spares
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    block_ids = torch.randperm(num_blocks - 1, generator=gen) + 1
    block_tables = torch.zeros(len(seqs), max(blocks_per_seq) + 1, dtype=torch.int32)
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    used = 0
    for b, (ctx, _) in enumerate(seqs):
        ids = block_ids[used:used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        block_tables[b, :len(ids)] = ids.int()
        slots = (ids[:, None] * block_size + torch.arange(block_size)).flatten()[:ctx]
        k_flat[slots] = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_flat[slots] = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)
    num_queries = [nq for _, nq in seqs]
    q = torch.randn(sum(num_queries), num_heads, head_dim, generator=gen).to(dtype)
    starts = torch.tensor([0] + num_queries).cumsum(0).to(torch.int32)
    return PagedBatch(
        seqs=tuple(seqs), q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
        seq_lens=torch.tensor([ctx for ctx, _ in seqs], dtype=torch.int32),
        query_start_locs=starts, scale=head_dim ** -0.5,
    )


def naive_attention(batch: PagedBatch, sliding_window: int | None) -> torch.Tensor:
    """float64 attention, position by position, with the causal/window mask spelled out."""
    num_heads = batch.q.shape[1]
    block_size, num_kv_heads = batch.k_cache.shape[1], batch.k_cache.shape[2]
    kv_head_of = torch.arange(num_heads) // (num_heads // num_kv_heads)
    out = torch.zeros(batch.q.shape, dtype=torch.float64)
    token = 0
    for b, (ctx, num_queries) in enumerate(batch.seqs):
        table = batch.block_tables[b].tolist()
        keys = torch.stack([batch.k_cache[table[j // block_size], j % block_size]
                            for j in range(ctx)]).double()  # [ctx, kv_heads, head_dim]
        values = torch.stack([batch.v_cache[table[j // block_size], j % block_size]
                              for j in range(ctx)]).double()
        for i in range(num_queries):
            pos = ctx - num_queries + i
            visible = [j for j in range(ctx)
                       if j <= pos and (sliding_window is None or j > pos - sliding_window)]
            k = keys[visible][:, kv_head_of]  # [n, heads, head_dim]
            v = values[visible][:, kv_head_of]
            scores = torch.einsum("hd,nhd->hn", batch.q[token].double(), k) * batch.scale
            out[token] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
            token += 1
    return out
