"""Batched heterogeneous LoRA: Triton SGMV shrink/expand kernels, the torch twin, and the CPU path.

Semantics: y[i] += scale[s] * (x[i] @ A[s]) @ B[s] with s = indices[i]; s = -1 leaves row i
untouched. Adapters are stacked by slot and zero-padded to the stacks' rank, so mixed ranks need no
special case. The CPU path (`group_rows` once per step, then `lora_grouped` per projection)
gathers every adapter row into one C++ BGMV call (kernels/csrc/lora_cpu.cpp) where the
extension is built; elsewhere (torch ops) slots with many rows (prefill chunks) get their own
matmuls and the rest one gathered group (`_bgmv`). This module only applies deltas; loading
adapters into slots is `adapters/`.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
) -> torch.Tensor:
    """y[i] += scale[s] * (x[i] @ A[s]) @ B[s], s = indices[i] (-1: row untouched); torch twin.

    Accumulates in float32 and rounds once into y's dtype.

    Args:
        y: [T, out], updated in place.
        x: [T, in].
        lora_a: [num_slots, in, max_rank] (max_rank: the stacks' rank, >= every slot's).
        lora_b: [num_slots, max_rank, out].
        scales: [num_slots] float.
        indices: [T] int32/int64 slot per row; -1 = no adapter.
    Returns:
        y.
    """
    for slot in indices.unique().tolist():
        if slot < 0:
            continue
        rows = (indices == slot).nonzero().squeeze(1)
        shrunk = x[rows].float() @ lora_a[slot].float()  # [rows, max_rank]
        delta = (shrunk @ lora_b[slot].float()) * scales[slot].float()
        y[rows] = (y[rows].float() + delta).to(y.dtype)
    return y


# On the torch route a slot with fewer rows than this in a step is gathered (BGMV) rather than
# given its own pair of matmuls. Measured on 2 CPU cores, SmolLM2-135M shapes, rank 8, LoRA
# alone on 7 projections x 30 layers: gathering wins up to 3 rows per slot (16 slots x 1 row:
# 50 vs 98 ms per step), loses from 4 (16 x 4: 178 vs 105 ms). A group costs a fixed handful of
# ops per projection; a gathered row costs its own copy of A's first ranks. The C++ route
# gathers every row (`gather_max_rows=None`): there a row costs only its arithmetic, and one
# call beat the pair of matmuls at every size measured, 16 to 1024 rows of one slot (AMX Xeon,
# bf16 activations: 5.8 vs 16.2 ms a step at 16 rows, 113 vs 494 ms at 1024;
# bench/results/lora_cpu_step_2026-12-06.*).
GATHER_MAX_ROWS = 4


@dataclass(frozen=True)
class LoRAGroup:
    """Rows of a step whose deltas are computed together on the torch path.

    `slots` is one slot for every row (two dense matmuls), or a [len(rows)] tensor of each
    row's slot (BGMV: each row's A ranks gathered for a batched matmul, its B rows read by
    one embedding_bag).
    """

    slots: int | torch.Tensor
    rows: torch.Tensor | None  # [n] int64 row ids; None = every row of the step, in order
    rank: int  # columns of A used: the slot's true rank, or the largest among gathered slots


def group_rows(indices: list[int], ranks: dict[int, int],
               gather_max_rows: int | None = GATHER_MAX_ROWS) -> list[LoRAGroup]:
    """Plan a step's LoRA rows once; every layer's LoRA calls share the plan.

    Slots with at least `gather_max_rows` rows (prefill chunks) get their own group; the
    rows of all other slots (decode rows spread over many adapters) form one gathered group.

    Args:
        indices: slot per row (-1 = none), as a host list.
        ranks: slot -> the adapter's true rank (columns past it are zero padding).
        gather_max_rows: the size at which a slot stops being gathered; None gathers every
            adapter row into one group (the C++ route's plan).
    """
    rows_of: dict[int, list[int]] = {}
    for i, slot in enumerate(indices):
        if slot >= 0:
            rows_of.setdefault(slot, []).append(i)
    if gather_max_rows is None:
        gathered = sorted(rows_of)
    else:
        gathered = sorted(s for s, rows in rows_of.items() if len(rows) < gather_max_rows)
        if len(gathered) < 2:  # a lone slot's rows are cheaper as plain matmuls than gathered
            gathered = []

    def row_ids(rows: list[int]) -> torch.Tensor | None:
        return None if len(rows) == len(indices) else torch.tensor(rows)

    groups = [LoRAGroup(s, row_ids(rows_of[s]), ranks[s]) for s in sorted(rows_of) if s not in gathered]
    if gathered:
        rows = sorted(i for s in gathered for i in rows_of[s])
        groups.append(LoRAGroup(torch.tensor([indices[i] for i in rows]), row_ids(rows),
                                max(ranks[s] for s in gathered)))
    return groups


def lora_grouped(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 scales: torch.Tensor, groups: list[LoRAGroup], ext: ModuleType | None = None) -> torch.Tensor:
    """Same result as `lora_reference`, with rows pre-planned and padding ranks skipped (CPU path).

    Accumulates in float32 and rounds once into y's dtype. Gathered groups run the C++ BGMV
    (`ext`, from kernels.cpu_ext) where lora_a is rank-major underneath, as the registry stores
    it on CPU; else, and without `ext`, torch ops (the twin: any layout is correct there).

    Args:
        y, x, lora_a, lora_b, scales: as in `lora_reference`.
        groups: from `group_rows`.
        ext: the compiled CPU kernels, or None for torch ops only.
    """
    # Checked once per call, not per group; the torch route skips it (it runs per projection).
    rank_major_a = lora_a.transpose(1, 2) if ext is not None else None
    if ext is not None and not (rank_major_a.is_contiguous() and lora_b.is_contiguous()
                                and y.dtype == x.dtype and lora_a.dtype in (torch.float32, x.dtype)
                                and lora_b.dtype == lora_a.dtype):
        ext = None
    for group in groups:
        rank = group.rank
        if ext is not None and not isinstance(group.slots, int):
            ext.lora_bgmv(y, x, rank_major_a, lora_b, scales,
                          group.slots, group.slots[:0] if group.rows is None else group.rows, rank)
            continue
        xs = (x if group.rows is None else x.index_select(0, group.rows)).float()  # [n, in]
        if isinstance(group.slots, int):
            slot = group.slots
            shrunk = (xs @ lora_a[slot, :, :rank].float()) * scales[slot].float()
            delta = shrunk @ lora_b[slot, :rank, :].float()  # [n, out]
        else:
            delta = _bgmv(xs, lora_a, lora_b, scales, group.slots, rank)
        _add_rows(y, group.rows, delta)
    return y


def _bgmv(xs: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
          slots: torch.Tensor, rank: int) -> torch.Tensor:
    """Semantics: delta[i] = scale[s] * (xs[i] @ A[s, :, :rank]) @ B[s, :rank], s = slots[i].

    Gathers only the rows' first `rank` ranks. Returns [n, out] float32.
    """
    a = lora_a.transpose(1, 2)[:, :rank].index_select(0, slots).float()  # [n, rank, in]
    shrunk = torch.bmm(a, xs[:, :, None]).squeeze(-1)  # [n, rank]
    shrunk *= scales.index_select(0, slots).float()[:, None]
    max_rank, out_features = lora_b.shape[1:]
    if lora_b.dtype != torch.float32:  # embedding_bag would accumulate in the 16-bit dtype
        b = lora_b[:, :rank].index_select(0, slots).float()  # [n, rank, out]
        return torch.bmm(shrunk[:, None, :], b).squeeze(1)
    # One fused gather + weighted sum over B's rows (viewed [num_slots * max_rank, out]):
    # delta[i] = sum_k shrunk[i, k] * B[s * max_rank + k], without copying B.
    ranks = torch.arange(rank, device=slots.device)
    ids = torch.add(ranks, slots[:, None], alpha=max_rank)  # [n, rank] = s * max_rank + k
    return F.embedding_bag(ids, lora_b.reshape(-1, out_features), mode="sum",
                           per_sample_weights=shrunk)


def _add_rows(y: torch.Tensor, rows: torch.Tensor | None, delta: torch.Tensor) -> None:
    """y[rows] += delta (rows None = all), with one rounding into y's dtype."""
    if y.dtype == torch.float32:
        if rows is None:
            y += delta
        else:
            y.index_add_(0, rows, delta)
    elif rows is None:
        y.copy_(y.float() + delta)
    else:
        y[rows] = (y.index_select(0, rows).float() + delta).to(y.dtype)


@triton.jit
def _lora_shrink_kernel(
    tmp_ptr, x_ptr, a_ptr, scales_ptr, order_ptr, slot_counts_ptr, slot_starts_ptr,
    in_features, rank, stride_xt, stride_as, stride_ak, stride_tt,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, RANK_P: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Semantics: tmp[i] = scale[s] * x[i] @ A[s] for the rows i of slot s (SGMV shrink).

    Args (grid = (cdiv(T, BLOCK_T), num_slots)):
        tmp_ptr: [T, rank] float32, written for rows with a slot.
        x_ptr: [T, in] unit stride on in.
        a_ptr: [num_slots, in, rank] unit stride on rank.
        scales_ptr: [num_slots] float.
        order_ptr: [T] int64 row ids sorted by slot; slot s owns
            order[slot_starts[s] : slot_starts[s] + slot_counts[s]].
        slot_counts_ptr, slot_starts_ptr: [num_slots] int64.
    """
    row_tile = tl.program_id(0)
    slot = tl.program_id(1)
    count = tl.load(slot_counts_ptr + slot)
    if row_tile * BLOCK_T >= count:
        return
    offs_t = row_tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_valid = offs_t < count
    rows = tl.load(order_ptr + tl.load(slot_starts_ptr + slot) + offs_t, mask=t_valid, other=0)
    offs_r = tl.arange(0, RANK_P)
    r_valid = offs_r < rank
    a_base = a_ptr + slot.to(tl.int64) * stride_as

    acc = tl.zeros([BLOCK_T, RANK_P], tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_valid = offs_k < in_features
        x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :],
                    mask=t_valid[:, None] & k_valid[None, :], other=0.0)
        a = tl.load(a_base + offs_k[:, None] * stride_ak + offs_r[None, :],
                    mask=k_valid[:, None] & r_valid[None, :], other=0.0)
        if DOT_F32:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        acc += tl.dot(x, a, input_precision=DOT_PRECISION)
    acc *= tl.load(scales_ptr + slot).to(tl.float32)
    tl.store(tmp_ptr + rows[:, None] * stride_tt + offs_r[None, :], acc,
             mask=t_valid[:, None] & r_valid[None, :])


@triton.jit
def _lora_expand_kernel(
    y_ptr, tmp_ptr, b_ptr, order_ptr, slot_counts_ptr, slot_starts_ptr,
    out_features, rank, stride_yt, stride_tt, stride_bs, stride_br,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, RANK_P: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Semantics: y[i] += tmp[i] @ B[s] for the rows i of slot s (SGMV expand).

    Args (grid = (cdiv(T, BLOCK_T), cdiv(out, BLOCK_N), num_slots)):
        y_ptr: [T, out] unit stride on out, read and written for rows with a slot.
        tmp_ptr: [T, rank] float32 from the shrink.
        b_ptr: [num_slots, rank, out] unit stride on out.
        order_ptr, slot_counts_ptr, slot_starts_ptr: as in `_lora_shrink_kernel`.
    """
    row_tile = tl.program_id(0)
    col_tile = tl.program_id(1)
    slot = tl.program_id(2)
    count = tl.load(slot_counts_ptr + slot)
    if row_tile * BLOCK_T >= count:
        return
    offs_t = row_tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_valid = offs_t < count
    rows = tl.load(order_ptr + tl.load(slot_starts_ptr + slot) + offs_t, mask=t_valid, other=0)
    offs_r = tl.arange(0, RANK_P)
    r_valid = offs_r < rank
    offs_n = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < out_features

    shrunk = tl.load(tmp_ptr + rows[:, None] * stride_tt + offs_r[None, :],
                     mask=t_valid[:, None] & r_valid[None, :], other=0.0)
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br
                + offs_n[None, :], mask=r_valid[:, None] & n_valid[None, :], other=0.0)
    if DOT_F32:
        b = b.to(tl.float32)
    else:
        # 16-bit tensor-core dot; the rank-r intermediate loses little at this precision.
        shrunk = shrunk.to(b.dtype)
    delta = tl.dot(shrunk, b, input_precision=DOT_PRECISION)
    y_offs = rows[:, None] * stride_yt + offs_n[None, :]
    y_mask = t_valid[:, None] & n_valid[None, :]
    y = tl.load(y_ptr + y_offs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_offs, (y + delta).to(y_ptr.dtype.element_ty), mask=y_mask)


def lora_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
) -> torch.Tensor:
    """y[i] += scale[s] * (x[i] @ A[s]) @ B[s], s = indices[i] (-1: row untouched); Triton.

    Same arguments, shapes and dtypes as `lora_reference`; y is updated in place and returned.

    Rows are grouped by slot with a device-side sort and counts (no host sync), then one
    shrink and one expand launch cover all slots.
    """
    num_tokens, in_features = x.shape
    num_slots, _, max_rank = lora_a.shape
    out_features = y.shape[1]
    if num_tokens == 0 or num_slots == 0:
        return y
    if y.stride(-1) != 1:
        raise ValueError("y needs a contiguous last dim (updated in place)")
    x = x if x.stride(-1) == 1 else x.contiguous()
    lora_a = lora_a if lora_a.stride(-1) == 1 else lora_a.contiguous()
    lora_b = lora_b if lora_b.stride(-1) == 1 else lora_b.contiguous()

    slot_of_row = indices.long()
    # Stable sort keeps rows of a slot in order; -1 rows sort first and are never read.
    order = torch.argsort(slot_of_row, stable=True)
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, slot_of_row + 1, torch.ones_like(slot_of_row))
    starts = torch.cumsum(counts, 0) - counts
    slot_counts, slot_starts = counts[1:].contiguous(), starts[1:].contiguous()
    tmp = torch.empty(num_tokens, max_rank, dtype=torch.float32, device=x.device)

    on_gpu = x.device.type == "cuda"
    block_t = 16  # tl.dot needs >= 16 rows
    rank_p = max(16, triton.next_power_of_2(max_rank))
    common = dict(DOT_F32=not on_gpu,  # NOTE: the CPU interpreter's bf16 tl.dot is wrong
                  DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    _lora_shrink_kernel[(triton.cdiv(num_tokens, block_t), num_slots)](
        tmp, x, lora_a, scales, order, slot_counts, slot_starts,
        in_features, max_rank, x.stride(0), lora_a.stride(0), lora_a.stride(1), tmp.stride(0),
        BLOCK_T=block_t, BLOCK_K=64, RANK_P=rank_p, **common,
    )
    block_n = 64
    _lora_expand_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(out_features, block_n),
                         num_slots)](
        y, tmp, lora_b, order, slot_counts, slot_starts,
        out_features, max_rank, y.stride(0), tmp.stride(0), lora_b.stride(0),
        lora_b.stride(1),
        BLOCK_T=block_t, BLOCK_N=block_n, RANK_P=rank_p, **common,
    )
    return y
