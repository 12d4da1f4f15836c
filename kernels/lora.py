"""Batched heterogeneous LoRA (SGMV style): Triton shrink/expand kernels and the torch twin.

Semantics: y[i] += scale[s] * (x[i] @ A[s]) @ B[s] with s = indices[i]; s = -1 leaves row i
untouched. Adapters are stacked by slot and zero-padded to max_rank, so mixed ranks need no
special case. This module only applies deltas; loading adapters into slots is `adapters/`.
"""
from __future__ import annotations

import torch
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
        lora_a: [num_slots, in, max_rank].
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


LoRAGroup = tuple[int, "torch.Tensor | None", int]  # (slot, row ids or None = every row, rank)


def group_rows(indices: list[int], ranks: dict[int, int]) -> list[LoRAGroup]:
    """Rows per slot, computed once per step and shared by every layer's LoRA calls.

    Args:
        indices: slot per row (-1 = none), as a host list.
        ranks: slot -> the adapter's true rank (columns past it are zero padding).
    """
    slots = sorted({s for s in indices if s >= 0})
    if len(slots) == 1 and -1 not in indices:
        return [(slots[0], None, ranks[slots[0]])]
    return [(s, torch.tensor([i for i, v in enumerate(indices) if v == s]), ranks[s]) for s in slots]


def lora_grouped(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 scales: torch.Tensor, groups: list[LoRAGroup]) -> torch.Tensor:
    """Same result as `lora_reference`, with rows pre-grouped and padding ranks skipped (CPU path).

    Args:
        y, x, lora_a, lora_b, scales: as in `lora_reference`.
        groups: from `group_rows`.
    """
    for slot, rows, rank in groups:
        a = lora_a[slot, :, :rank].float()
        b = lora_b[slot, :rank, :].float()
        if rows is None:
            y += ((x.float() @ a) @ b * scales[slot].float()).to(y.dtype)
        else:
            delta = (x[rows].float() @ a) @ b * scales[slot].float()
            y.index_add_(0, rows, delta.to(y.dtype))
    return y


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
