"""Paged attention over a block-table KV cache: one entry for prefill/extend and decode.

Semantics: for sequence b with query tokens q[qs[b]:qs[b+1]] occupying the last
positions of its context of length seq_lens[b], each query at position p attends
causally to keys at positions j <= p (and j > p - sliding_window when a window is
set), reading K/V from k_cache/v_cache through block_tables[b].

This module holds the Triton kernel (`paged_attention_triton`, used on CUDA) and its
pure-torch twin (`paged_attention_reference`, used on CPU and as the kernel's oracle).
The split-K (flash-decoding) reduction lives in `kernels.paged_attention_decode`.
It does not write the cache (see `kernels.reshape_and_cache`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.paged_attention_decode import (
    alloc_partials,
    reduce_partitions,
    should_split_k,
)

LOG2E = 1.4426950408889634


def gather_context(
    cache: torch.Tensor, block_table: torch.Tensor, context_len: int
) -> torch.Tensor:
    """Gather one sequence's first `context_len` cached positions into a contiguous tensor.

    Args:
        cache: [num_blocks, block_size, num_kv_heads, head_dim].
        block_table: [max_blocks_per_seq] int32/int64 block ids.
        context_len: number of positions to return.
    Returns:
        [context_len, num_kv_heads, head_dim].
    """
    block_size = cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [n, block_size, kv_heads, head_dim]
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:context_len]


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_locs: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Torch twin of the paged attention kernel.

    Args:
        q: [num_tokens, num_heads, head_dim], queries of all sequences packed flat.
        k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
        block_tables: [num_seqs, max_blocks_per_seq] int32.
        seq_lens: [num_seqs] total context length of each sequence after this step.
        query_start_locs: [num_seqs + 1] cumulative query token offsets into q.
        scale: softmax scale (usually head_dim ** -0.5).
        sliding_window: if set, a query at position p sees only keys in (p - W, p].
    Returns:
        [num_tokens, num_heads, head_dim] in q's dtype.
    """
    num_heads = q.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    seq_lens_list = seq_lens.tolist()
    starts = query_start_locs.tolist()
    decode = [b for b in range(len(seq_lens_list)) if starts[b + 1] - starts[b] == 1]
    if len(decode) > 1:
        # NOTE: one-query sequences go through one padded, masked batch: a Python loop per
        # sequence costs more than the attention itself on CPU.
        rows = torch.tensor([starts[b] for b in decode], device=q.device)
        idx = torch.tensor(decode, device=q.device)
        out[rows] = _decode_batch(q[rows], k_cache, v_cache, block_tables[idx], seq_lens[idx].long(),
                                  scale, sliding_window)
    done = set(decode) if len(decode) > 1 else set()
    for b, context_len in enumerate(seq_lens_list):
        q_start, q_end = starts[b], starts[b + 1]
        num_queries = q_end - q_start
        if num_queries == 0 or b in done:
            continue
        k = gather_context(k_cache, block_tables[b], context_len)
        v = gather_context(v_cache, block_tables[b], context_len)
        # [heads, tokens, head_dim]; GQA by repeating each KV head over its query group.
        qb = q[q_start:q_end].transpose(0, 1)
        kb = k.transpose(0, 1).repeat_interleave(group, dim=0)
        vb = v.transpose(0, 1).repeat_interleave(group, dim=0)
        q_pos = torch.arange(context_len - num_queries, context_len, device=q.device)
        k_pos = torch.arange(context_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
        ob = F.scaled_dot_product_attention(
            qb.unsqueeze(0), kb.unsqueeze(0), vb.unsqueeze(0),
            attn_mask=mask, scale=scale,
        )
        out[q_start:q_end] = ob[0].transpose(0, 1)
    return out


def _decode_batch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float, sliding_window: int | None) -> torch.Tensor:
    """Twin's decode path: one query per sequence, contexts padded to the longest and masked.

    Args:
        q: [B, num_heads, head_dim], the query at position seq_lens[b] - 1.
        block_tables: [B, max_blocks]; seq_lens: [B] int64.
    Returns:
        [B, num_heads, head_dim] in q's dtype.
    """
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = -(-int(seq_lens.max()) // block_size)
    tables = block_tables[:, :num_blocks].long()
    length = num_blocks * block_size
    # [B, kv_heads, L, head_dim], computed in float32 as the Triton kernel accumulates.
    k = k_cache[tables].reshape(batch, length, num_kv_heads, head_dim).transpose(1, 2).float()
    v = v_cache[tables].reshape(batch, length, num_kv_heads, head_dim).transpose(1, 2).float()
    qg = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = (qg @ k.transpose(-1, -2)) * scale  # [B, kv_heads, group, L]
    pos = torch.arange(length, device=q.device)
    valid = pos[None, :] < seq_lens[:, None]
    if sliding_window is not None:
        valid &= pos[None, :] > seq_lens[:, None] - 1 - sliding_window
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    # Padding slots may hold garbage (even NaN); 0 * NaN would leak through the matmul.
    v = v.masked_fill(~valid[:, None, :, None], 0.0)
    out = scores.softmax(-1) @ v  # [B, kv_heads, group, head_dim]
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


@triton.jit
def _find_seq_idx(query_start_locs_ptr, tile_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """Return the sequence owning global query tile `tile_idx`.

    Sequence b owns tiles starting at qs[b] // BLOCK_Q + b: a per-sequence upper bound on
    its tile count, so the grid is sized from num_tokens alone (no host sync).
    """
    # NOTE: typed so both are int32 tensors for the while loop, even if num_seqs is constant.
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_locs_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_locs_ptr,
    scale_log2, num_seqs, window, num_heads, num_parts,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr, PARTITION_SIZE: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Semantics: out[t, h] = softmax_j(scale * q[t, h] . k[j, h // G]) @ v[j, h // G] over the
    keys j of t's sequence with j <= pos(t) (and j > pos(t) - window), G = GROUP.

    Args (grid = (num_tokens // BLOCK_Q + num_seqs, num_kv_heads, num_parts)):
        out_ptr: [num_tokens, num_heads, HEAD_DIM] q dtype, written unless split.
        part_m_ptr, part_l_ptr: [num_tokens, num_heads, num_parts] float32, written if split.
        part_acc_ptr: [num_tokens, num_heads, num_parts, HEAD_DIM] float32, written if split.
        q_ptr: [num_tokens, num_heads, HEAD_DIM] fp32/fp16/bf16, unit stride on HEAD_DIM.
        k_cache_ptr, v_cache_ptr: [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM], q dtype.
        block_tables_ptr: [num_seqs, max_blocks] int32.
        seq_lens_ptr: [num_seqs] int32; query_start_locs_ptr: [num_seqs + 1] int32.
        scale_log2: softmax scale * log2(e); window: sliding window (if USE_WINDOW).

    Program (tile, kv_head, part) computes BLOCK_Q query tokens x GROUP_P query heads of one
    KV head: rows m = token * GROUP_P + head_in_group, so GQA shares each K/V tile over the
    group and decode still fills >= 16 rows for tl.dot. With PARTITION_SIZE > 0 it covers
    only keys of its partition and writes unnormalised partials (max and sum in the log2
    domain, acc) for `reduce_partitions`.
    """
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)

    seq = _find_seq_idx(query_start_locs_ptr, tile_idx, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_locs_ptr + seq)
    q_len = tl.load(query_start_locs_ptr + seq + 1) - q_start
    q_tile = tile_idx - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    context_len = tl.load(seq_lens_ptr + seq)
    first_pos = context_len - q_len  # position of the sequence's first query

    offs_m = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + offs_m // GROUP_P  # query index within the sequence
    head_in_group = offs_m % GROUP_P
    head = kv_head * GROUP + head_in_group
    row_valid = (tok < q_len) & (head_in_group < GROUP)
    q_pos = first_pos + tok
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_valid = offs_d < HEAD_DIM

    q_rows = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_M, HEAD_DIM_P]
    if DOT_F32:
        q = q.to(tl.float32)

    # Key range the tile can see; KV tiles wholly outside it are never visited.
    kv_end = first_pos + tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, q_len)
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(first_pos + q_tile * BLOCK_Q - window + 1, 0)
    if PARTITION_SIZE > 0:
        kv_start = tl.maximum(kv_start, part * PARTITION_SIZE)
        kv_end = tl.minimum(kv_end, (part + 1) * PARTITION_SIZE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile_start in range((kv_start // TILE_N) * TILE_N, kv_end, TILE_N):
        offs_n = tile_start + tl.arange(0, TILE_N)
        # NOTE: keys outside [kv_start, kv_end) are never loaded: unwritten cache slots
        # may hold NaN/Inf, and 0 * NaN would leak through p @ v.
        n_valid = (offs_n >= kv_start) & (offs_n < kv_end)
        block_ids = tl.load(block_table + offs_n // BLOCK_SIZE, mask=n_valid, other=0)
        block_ids = block_ids.to(tl.int64)
        k_offs = block_ids * stride_kb + (offs_n % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
        v_offs = block_ids * stride_vb + (offs_n % BLOCK_SIZE) * stride_vs + kv_head * stride_vh
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_cache_ptr + k_offs[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + v_offs[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [M, N]
        mask = n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            mask = mask & (offs_n[None, :] > q_pos[:, None] - window)
        qk = tl.where(mask, qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row may see no key yet (padding rows, first window tile): keep exp2 finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    head_valid = row_valid[:, None] & d_valid[None, :]
    if PARTITION_SIZE > 0:
        # Partials are [num_tokens, num_heads, num_parts(, HEAD_DIM)], contiguous.
        part_rows = ((q_start + tok).to(tl.int64) * num_heads + head) * num_parts + part
        tl.store(part_m_ptr + part_rows, m_i, mask=row_valid)
        tl.store(part_l_ptr + part_rows, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part_rows[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=head_valid)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_rows = (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
        tl.store(out_ptr + o_rows[:, None] + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_valid)


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_locs: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    split_k: bool | None = None,
    partition_size: int = 512,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton paged attention: out[t, h] = causal (windowed) softmax attention of q[t, h] over
    its sequence's paged K/V; same semantics, shapes and dtypes as `paged_attention_reference`.

    Args:
        split_k: None chooses flash-decoding for long decode-only batches that would not
            fill the GPU; True/False force it on/off (any batch is valid with True).
        partition_size: keys per split-K partition, a multiple of the KV tile (32).
        out: optional [num_tokens, num_heads, head_dim] buffer to write into.
    Returns:
        [num_tokens, num_heads, head_dim] in q's dtype (`out` when given).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache need a contiguous head_dim")
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0:
        return out

    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    on_gpu = q.device.type == "cuda"
    is_decode = num_tokens == num_seqs
    # tl.dot needs >= 16 rows; decode tiles stay small so one query's group fills them.
    block_q = max(1, (16 if is_decode else 64) // group_p)
    tile_n = 32
    num_tiles = num_tokens // block_q + num_seqs
    context_bound = block_tables.shape[1] * block_size  # no host sync on seq_lens
    if split_k is None:
        split_k = should_split_k(q.device, is_decode, num_seqs * num_kv_heads,
                                 context_bound, partition_size)
    if split_k and partition_size % tile_n:
        raise ValueError(f"partition_size {partition_size} must be a multiple of {tile_n}")
    num_parts = triton.cdiv(context_bound, partition_size) if split_k else 1
    part_m, part_l, part_acc = alloc_partials(num_tokens, num_heads, num_parts, head_dim,
                                              q.device, split_k)
    _paged_attention_kernel[(num_tiles, num_kv_heads, num_parts)](
        out, part_m, part_l, part_acc,
        q, k_cache, v_cache, block_tables, seq_lens, query_start_locs,
        scale * LOG2E, num_seqs, sliding_window or 0, num_heads, num_parts,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_P=group_p, BLOCK_Q=block_q,
        HEAD_DIM=head_dim, HEAD_DIM_P=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, TILE_N=tile_n, USE_WINDOW=sliding_window is not None,
        PARTITION_SIZE=partition_size if split_k else 0,
        # NOTE: only the interpreter runs on CPU tensors, and its bf16 tl.dot is wrong.
        DOT_F32=not on_gpu,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )
    if split_k:
        reduce_partitions(out, part_m, part_l, part_acc)
    return out
