"""Split-K (flash-decoding) support for `kernels.paged_attention`: partial buffers and the reduce.

A long decode batch that would leave most SMs idle (few sequences x KV heads) is split
along the context into partitions; `_paged_attention_kernel` writes per-partition partials
(running max and sum in the log2 domain, unnormalised acc) and `_reduce_partitions_kernel`
merges them. This module owns only the policy, the buffers and the merge, not attention.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Partitions merged per loop step of the reduce: bounds registers for 100k+ contexts.
_PART_CHUNK = 16


def should_split_k(
    device: torch.device, is_decode: bool, num_programs: int, context_bound: int,
    partition_size: int,
) -> bool:
    """Use split-K when a decode batch is long and its (seq, kv_head) programs under-fill the GPU.

    Args:
        device: where the kernel runs (SM count on CUDA; a nominal 132 elsewhere).
        is_decode: every sequence has exactly one query token.
        num_programs: num_seqs * num_kv_heads, the unsplit decode grid.
        context_bound: an upper bound on context length (block table width * block size).
        partition_size: keys per partition.
    """
    if not is_decode or context_bound < 2 * partition_size:
        return False
    num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 132)
    return num_programs < num_sms


def alloc_partials(
    num_tokens: int, num_heads: int, num_parts: int, head_dim: int, device: torch.device,
    split_k: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Allocate split-K partials: max and sum [T, H, P] and acc [T, H, P, D], all float32.

    Without split-K the kernel never touches them; 1-element placeholders keep one signature.
    """
    if not split_k:
        dummy = torch.empty(1, dtype=torch.float32, device=device)
        return dummy, dummy, dummy
    part_m = torch.empty(num_tokens, num_heads, num_parts, dtype=torch.float32, device=device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(num_tokens, num_heads, num_parts, head_dim,
                           dtype=torch.float32, device=device)
    return part_m, part_l, part_acc


@triton.jit
def _reduce_partitions_kernel(
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, num_parts, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, PART_CHUNK: tl.constexpr,
):
    """Semantics: out[t, h] = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p, M = max_p m_p.

    Args (grid = (num_tokens, num_heads)):
        out_ptr: [num_tokens, num_heads, head_dim] q dtype, written.
        part_m_ptr, part_l_ptr: [num_tokens, num_heads, num_parts] float32; m = -inf marks
            a partition with no visible key (l = 0, acc = 0).
        part_acc_ptr: [num_tokens, num_heads, num_parts, head_dim] float32.
    """
    tok = tl.program_id(0)
    head = tl.program_id(1)
    base = (tok.to(tl.int64) * tl.num_programs(1) + head) * num_parts
    offs_c = tl.arange(0, PART_CHUNK)
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_valid = offs_d < HEAD_DIM

    m_max = tl.full([PART_CHUNK], float("-inf"), tl.float32)
    for start in range(0, num_parts, PART_CHUNK):
        m = tl.load(part_m_ptr + base + start + offs_c, mask=start + offs_c < num_parts,
                    other=float("-inf"))
        m_max = tl.maximum(m_max, m)
    m_all = tl.max(m_max, 0)  # finite: every query sees at least itself

    denom = tl.zeros([PART_CHUNK], tl.float32)
    acc = tl.zeros([PART_CHUNK, HEAD_DIM_P], tl.float32)
    for start in range(0, num_parts, PART_CHUNK):
        p_valid = start + offs_c < num_parts
        m = tl.load(part_m_ptr + base + start + offs_c, mask=p_valid, other=float("-inf"))
        l = tl.load(part_l_ptr + base + start + offs_c, mask=p_valid, other=0.0)
        weight = tl.exp2(m - m_all)
        denom += weight * l
        # Empty partitions are skipped by the mask: their acc is never read.
        has_keys = p_valid & (m > float("-inf"))
        part_acc = tl.load(
            part_acc_ptr + (base + start + offs_c)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=has_keys[:, None] & d_valid[None, :], other=0.0)
        acc += part_acc * weight[:, None]
    out = tl.sum(acc, 0) / tl.sum(denom, 0)
    tl.store(out_ptr + tok.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=d_valid)


def reduce_partitions(
    out: torch.Tensor, part_m: torch.Tensor, part_l: torch.Tensor, part_acc: torch.Tensor,
) -> torch.Tensor:
    """Merge split-K partials into `out` [num_tokens, num_heads, head_dim] in place."""
    num_tokens, num_heads, num_parts, head_dim = part_acc.shape
    _reduce_partitions_kernel[(num_tokens, num_heads)](
        out, part_m, part_l, part_acc, num_parts, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_P=triton.next_power_of_2(head_dim),
        PART_CHUNK=_PART_CHUNK, num_warps=4,
    )
    return out
