"""CPU paged attention: the fast path the engine runs on CPU (the twin stays the oracle).

`paged_attention_reference` (kernels.paged_attention) is written to be obviously right and
rebuilds everything in every layer: block gathers of the padded context, float32 copies,
masks. Here the part that depends only on the step (which cache slots each sequence reads,
its masks) is planned once per step (`plan_attention`) and shared by all layers.

Single-query (decode) rows go to the C++ kernel (kernels/csrc/paged_decode_cpu.cpp, through
kernels.cpu_ext), which reads each sequence's KV blocks in place, once per layer; where it is
not built, they gather their padded contexts and run float32 SDPA. Multi-query rows (prefills,
chunks) go to the C++ brgemm kernel (kernels/csrc/paged_prefill_cpu.cpp) over bf16 caches where
oneDNN packs bf16 into AMX tiles; elsewhere they gather exactly their context slots
and run SDPA in the cache dtype with grouped-query heads (no repeat_interleave).

Semantics are the twin's (see kernels.paged_attention). Padding slots of the decode batch
point at the sequence's own first key, so they always hold finite values and are masked.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels import cpu_ext

# The prefill kernel packs the keys and values of the sequences it handles at once; past this
# it runs in rounds (64 MiB: a step of 8 x 2048-token contexts of 8 kv heads x 128 dims).
PREFILL_PACK_BUDGET_BYTES = 64 << 20


@dataclass
class _MultiQuery:
    """A sequence that feeds several queries this step (prefill, a chunk, an extension)."""

    q_start: int
    q_end: int
    table: torch.Tensor  # [max_blocks] int64, its block table row
    block_size: int
    context_len: int
    _slots: torch.Tensor | None = field(default=None, repr=False)

    @property
    def slots(self) -> torch.Tensor:
        """[context_len] int64 flat cache slots, made on first use: only the SDPA route gathers
        by them (the prefill kernel reads the block table), and then once for all layers."""
        if self._slots is None:
            pos = torch.arange(self.context_len)
            self._slots = self.table[pos // self.block_size] * self.block_size + pos % self.block_size
        return self._slots


@dataclass
class CPUAttentionPlan:
    """Gather indices of one step, shared by every layer; masks built per window on first use."""

    decode_rows: torch.Tensor | None  # [Bd] int64 q rows of the one-query sequences
    decode_lens: torch.Tensor | None  # [Bd] int32 context lengths
    decode_width: int  # L: the longest decode context
    decode_tables: torch.Tensor | None  # [Bd, max_blocks] int32 block tables (the C++ kernel's input)
    multi: list[_MultiQuery]
    all_decode: bool  # every sequence has exactly one query (rows are 0..Bd-1 in order)
    block_size: int
    # The prefill kernel's inputs: every sequence's table, context length and query offsets
    # (int32; it skips the one-query ones). None when no sequence feeds several queries.
    multi_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    _masks: dict = field(default_factory=dict)
    _decode_slots: torch.Tensor | None = field(default=None, repr=False)

    @property
    def decode_slots(self) -> torch.Tensor | None:
        """[Bd * L] int64 flat slots of the decode rows' keys, padding -> the row's first key.
        Made on first use: only the SDPA route gathers (it was 0.2 ms of a batch-64 plan)."""
        if self._decode_slots is None and self.decode_tables is not None:
            pos = torch.arange(self.decode_width)
            pos = torch.where(pos[None, :] < self.decode_lens[:, None], pos[None, :], 0)  # [Bd, L]
            blocks = self.decode_tables.long().gather(1, pos // self.block_size)
            self._decode_slots = (blocks * self.block_size + pos % self.block_size).reshape(-1)
        return self._decode_slots

    def decode_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [Bd, 1, 1, L]: 0 where a key is visible, -inf elsewhere."""
        key = ("decode", window, dtype)
        if key not in self._masks:
            pos = torch.arange(self.decode_width)
            lens = self.decode_lens[:, None]
            valid = pos[None, :] < lens
            if window is not None:
                valid &= pos[None, :] > lens - 1 - window
            mask = torch.zeros(valid.shape, dtype=dtype).masked_fill_(~valid, float("-inf"))
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def multi_mask(self, index: int, window: int | None) -> torch.Tensor | None:
        """Boolean mask [nq, ctx] of a multi-query sequence (None: plain causal from 0)."""
        key = ("multi", index, window)
        if key not in self._masks:
            m = self.multi[index]
            num_queries = m.q_end - m.q_start
            if window is None and num_queries == m.context_len:
                self._masks[key] = None  # is_causal covers it
            else:
                q_pos = torch.arange(m.context_len - num_queries, m.context_len)
                k_pos = torch.arange(m.context_len)
                mask = k_pos[None, :] <= q_pos[:, None]
                if window is not None:
                    mask &= k_pos[None, :] > q_pos[:, None] - window
                self._masks[key] = mask
        return self._masks[key]


def plan_attention(block_tables: torch.Tensor, seq_lens: list[int], query_start_locs: list[int],
                   block_size: int) -> CPUAttentionPlan:
    """Plan a step: which flat cache slots each sequence's keys live in.

    Args:
        block_tables: [num_seqs, max_blocks] int32 (CPU).
        seq_lens: context length of each sequence after the step.
        query_start_locs: [num_seqs + 1] cumulative query offsets.
    """
    decode = [b for b in range(len(seq_lens)) if query_start_locs[b + 1] - query_start_locs[b] == 1]
    decode_rows = decode_lens = decode_tables = None
    width = 0
    if decode:
        idx = torch.tensor(decode)
        decode_lens = torch.tensor([seq_lens[b] for b in decode], dtype=torch.int32)
        width = int(decode_lens.max())
        decode_rows = torch.tensor([query_start_locs[b] for b in decode])
        all_rows = len(decode) == len(seq_lens)
        decode_tables = (block_tables if all_rows else block_tables.index_select(0, idx)).to(torch.int32).contiguous()
    multi = []
    tables = None  # int64 rows for the multi-query sequences' gathers
    for b, context_len in enumerate(seq_lens):
        q_start, q_end = query_start_locs[b], query_start_locs[b + 1]
        if q_end - q_start <= 1:
            continue
        tables = block_tables.long() if tables is None else tables
        multi.append(_MultiQuery(q_start, q_end, tables[b], block_size, context_len))
    multi_inputs = None
    if multi:
        multi_inputs = (block_tables.to(torch.int32).contiguous(), torch.tensor(seq_lens, dtype=torch.int32),
                        torch.tensor(query_start_locs, dtype=torch.int32))
    return CPUAttentionPlan(decode_rows, decode_lens, width, decode_tables, multi,
                            all_decode=len(decode) == len(seq_lens), block_size=block_size, multi_inputs=multi_inputs)


def paged_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        plan: CPUAttentionPlan, scale: float,
                        sliding_window: int | None = None, use_kernel: bool = True) -> torch.Tensor:
    """Paged attention of one layer over a step's plan.

    Args:
        q: [num_tokens, num_heads, head_dim].
        k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
    Returns:
        [num_tokens, num_heads, head_dim] in q's dtype.
    """
    head_dim = q.shape[2]
    num_kv_heads = k_cache.shape[2]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    out = q.new_empty(q.shape) if not plan.all_decode else None
    if plan.decode_rows is not None:
        qd = q if plan.all_decode else q.index_select(0, plan.decode_rows)
        ext = cpu_ext.decode_kernel_for(q.dtype) if use_kernel else None
        if ext is not None:
            od = torch.empty(qd.shape, dtype=qd.dtype)
            ext.paged_decode_attention(od, qd, k_cache, v_cache, plan.decode_tables, plan.decode_lens,
                                       scale, sliding_window or 0)
        else:
            od = _decode_torch(qd, k_flat, v_flat, plan, scale, sliding_window)
        if plan.all_decode:
            return od
        out.index_copy_(0, plan.decode_rows, od)
    if not plan.multi:
        return out
    ext = cpu_ext.prefill_kernel_for(q.dtype) if use_kernel else None
    if ext is not None:
        ext.paged_prefill_attention(out, q, k_cache, v_cache, *plan.multi_inputs, scale, sliding_window or 0,
                                    PREFILL_PACK_BUDGET_BYTES)
        return out
    for i, m in enumerate(plan.multi):
        k = k_flat.index_select(0, m.slots).transpose(0, 1)  # [kv_heads, ctx, head_dim]
        v = v_flat.index_select(0, m.slots).transpose(0, 1)
        qm = q[m.q_start:m.q_end].transpose(0, 1)  # [heads, nq, head_dim]
        mask = plan.multi_mask(i, sliding_window)
        om = F.scaled_dot_product_attention(qm[None], k[None], v[None], attn_mask=mask,
                                            is_causal=mask is None, scale=scale, enable_gqa=True)
        out[m.q_start:m.q_end] = om[0].transpose(0, 1)
    return out


def _decode_torch(qd: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, plan: CPUAttentionPlan,
                  scale: float, sliding_window: int | None) -> torch.Tensor:
    """The single-query rows through a gathered, padded copy of their contexts and SDPA (the
    route where the C++ kernel is off or missing)."""
    batch, width = plan.decode_rows.shape[0], plan.decode_width
    num_heads, (num_kv_heads, head_dim) = qd.shape[1], k_flat.shape[1:]
    # Float32 math even over a 16-bit cache: CPU SDPA over bf16 is 4-6x slower without AMX
    # (1.5-2 vs 0.3-0.5 ms per layer at batch 16 x 200 keys on an AVX512-BF16 EPYC, gather and
    # widening included), and it is the more exact of the two.
    math_dtype = torch.float32 if qd.dtype in (torch.bfloat16, torch.float16) else qd.dtype
    # [Bd, L, kv_heads, head_dim]
    k = k_flat.index_select(0, plan.decode_slots).to(math_dtype).view(batch, width, num_kv_heads, head_dim)
    v = v_flat.index_select(0, plan.decode_slots).to(math_dtype).view(batch, width, num_kv_heads, head_dim)
    od = F.scaled_dot_product_attention(
        qd.to(math_dtype).view(batch, num_heads, 1, head_dim), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=plan.decode_mask(sliding_window, math_dtype), scale=scale, enable_gqa=True)
    return od.view(batch, num_heads, head_dim).to(qd.dtype)


def write_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    """Scatter this step's key/value rows [num_tokens, kv_heads, head_dim] into their slots
    (all valid: unlike the twin, no pass over the mapping for skipped rows)."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)
