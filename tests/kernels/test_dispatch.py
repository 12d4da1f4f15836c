"""kernels.dispatch routes to Triton or the twin, and `kernels` resolves to this repository."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kernels
from kernels import dispatch
from tests.kernels.helpers import TOLERANCE, case_seed, make_paged_batch, rel_err


def test_kernels_package_is_ours_not_pypi():
    repo_root = Path(__file__).resolve().parents[2]
    assert Path(kernels.__file__).resolve().parent == repo_root / "kernels"


def test_backend_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not dispatch.use_triton(cpu) and dispatch.use_triton(cuda)
    assert dispatch.use_triton(cpu, "triton") and not dispatch.use_triton(cuda, "torch")
    with pytest.raises(ValueError):
        dispatch.use_triton(cpu, "cuda")


def test_backends_agree_end_to_end():
    # One decode step as the model runs it: write the new K/V, then attend, then LoRA.
    batch = make_paged_batch([(20, 1), (33, 4)], 4, 2, 64, 16, torch.float32,
                             seed=case_seed("dispatch"))
    gen = torch.Generator().manual_seed(case_seed("dispatch-kv"))
    num_tokens = batch.q.shape[0]
    key = torch.randn(num_tokens, 2, 64, generator=gen)
    value = torch.randn(num_tokens, 2, 64, generator=gen)
    # The new tokens are the last positions of each context: their slots in the table.
    slots = []
    for b, (ctx, num_queries) in enumerate(batch.seqs):
        for pos in range(ctx - num_queries, ctx):
            slots.append(int(batch.block_tables[b, pos // 16]) * 16 + pos % 16)
    slot_mapping = torch.tensor(slots)
    x = torch.randn(num_tokens, 32, generator=gen)
    lora_a = torch.randn(2, 32, 8, generator=gen)
    lora_b = torch.randn(2, 8, 48, generator=gen)
    scales, indices = torch.tensor([0.5, 2.0]), torch.tensor([1, -1, 0, 0, 1])
    outputs = {}
    for backend in ("torch", "triton"):
        k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
        dispatch.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, backend=backend)
        attn = dispatch.paged_attention(batch.q, k_cache, v_cache, batch.block_tables,
                                        batch.seq_lens, batch.query_start_locs, batch.scale,
                                        None, backend=backend)
        y = dispatch.lora_apply(torch.zeros(num_tokens, 48), x, lora_a, lora_b, scales,
                                indices, backend=backend)
        outputs[backend] = (attn, y)
    for got, expected in zip(outputs["triton"], outputs["torch"]):
        assert rel_err(got, expected) <= TOLERANCE[torch.float32]
