"""Choose each kernel's implementation: Triton on CUDA, torch on CPU.

On CPU, paged attention runs the planned path (kernels.paged_attention_cpu) when the caller
planned the step, else the twin; the twin stays the oracle of both.

`ALIGNSERVE_KERNELS=triton|torch` (read in server.config) forces one side; tests pass
`backend=` explicitly instead. Each kernel's Triton code and twin live side by side in
its own module; this module only routes.
"""
from __future__ import annotations

from typing import Any

import torch

from kernels import cpu_ext
from kernels.lora import GATHER_MAX_ROWS, LoRAGroup, group_rows, lora_grouped, lora_reference, lora_triton
from kernels.paged_attention import paged_attention_reference, paged_attention_triton
from kernels.paged_attention_cpu import CPUAttentionPlan, paged_attention_cpu, write_cache
from kernels.reshape_and_cache import reshape_and_cache_reference, reshape_and_cache_triton


def use_triton(device: torch.device, backend: str = "auto") -> bool:
    """Return True when the Triton kernel should run for tensors on `device`."""
    if backend == "triton":
        return True
    if backend == "torch":
        return False
    if backend != "auto":
        raise ValueError(f"unknown kernel backend {backend!r} (auto|triton|torch)")
    return device.type == "cuda"


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_locs: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    backend: str = "auto",
    plan: CPUAttentionPlan | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Paged attention (see kernels.paged_attention for semantics and shapes).

    `plan` (kernels.paged_attention_cpu.plan_attention of this step) selects the fast torch
    path; `kwargs` (split_k, partition_size, out) reach the Triton kernel only.
    """
    if use_triton(q.device, backend):
        return paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens,
                                      query_start_locs, scale, sliding_window, **kwargs)
    if plan is not None:
        return paged_attention_cpu(q, k_cache, v_cache, plan, scale, sliding_window)
    return paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens,
                                     query_start_locs, scale, sliding_window)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: str = "auto",
    plan: CPUAttentionPlan | None = None,
) -> None:
    """Write key/value rows into cache slots (see kernels.reshape_and_cache). With a CPU
    `plan` every slot is a real one (the runner never skips), so no masking pass."""
    if use_triton(key.device, backend):
        return reshape_and_cache_triton(key, value, k_cache, v_cache, slot_mapping)
    if plan is not None:
        return write_cache(key, value, k_cache, v_cache, slot_mapping)
    return reshape_and_cache_reference(key, value, k_cache, v_cache, slot_mapping)


def lora_plan(indices: list[int], ranks: dict[int, int], device: torch.device, dtype: torch.dtype,
              backend: str = "auto") -> list[LoRAGroup] | None:
    """The step's LoRA row plan for `lora_apply`: None for Triton (it groups on the device);
    on CPU every adapter row in one gathered group where the C++ BGMV runs, else the torch
    route's groups (see kernels.lora.group_rows).

    Args:
        indices: slot per row (-1 = none); ranks: slot -> true rank; dtype: the activations'.
    """
    if use_triton(device, backend):
        return None
    native = cpu_ext.kernels_for(torch.empty(0, dtype=dtype, device=device), backend) is not None
    return group_rows(indices, ranks, None if native else GATHER_MAX_ROWS)


def lora_apply(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
    backend: str = "auto",
    groups: list[LoRAGroup] | None = None,
) -> torch.Tensor:
    """Add each row's LoRA delta to y in place and return y (see kernels.lora).

    `groups` (the step's LoRA plan from kernels.lora.group_rows) lets the CPU path skip
    regrouping and rank padding on every call, and gather rows in the C++ BGMV under "auto".
    """
    if use_triton(x.device, backend):
        return lora_triton(y, x, lora_a, lora_b, scales, indices)
    if groups is not None:
        return lora_grouped(y, x, lora_a, lora_b, scales, groups, ext=cpu_ext.kernels_for(x, backend))
    return lora_reference(y, x, lora_a, lora_b, scales, indices)
