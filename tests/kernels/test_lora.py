"""Batched LoRA: Triton (interpreted) == torch twin over dtype x rank x batch x popularity."""
from __future__ import annotations

import pytest
import torch

from kernels.lora import lora_reference, lora_triton
from tests.kernels.helpers import DTYPES, TOLERANCE, case_seed, rel_err

NUM_SLOTS, IN_FEATURES, OUT_FEATURES = 8, 72, 96  # out > one 64-wide expand tile
PATTERNS = ["none", "distinct", "uniform", "repeated", "zipf", "identical"]


def _indices(pattern: str, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Per-row slot ids (-1 = base model) with a given adapter popularity."""
    if pattern == "none":
        return torch.full((batch,), -1)
    if pattern == "distinct":
        return torch.arange(batch) % NUM_SLOTS
    if pattern == "uniform":
        return torch.randint(-1, NUM_SLOTS, (batch,), generator=gen)
    if pattern == "repeated":  # runs of one adapter, as in a prefill segment
        runs = torch.randint(-1, NUM_SLOTS, (-(-batch // 3),), generator=gen)
        return runs.repeat_interleave(3)[:batch]
    if pattern == "zipf":  # base model most popular, then a long tail
        weights = 1.0 / torch.arange(1, NUM_SLOTS + 2, dtype=torch.float64) ** 1.2
        return torch.multinomial(weights, batch, replacement=True, generator=gen) - 1
    if pattern == "identical":
        return torch.full((batch,), 3)
    raise ValueError(pattern)


def _weights(rank: int, dtype: torch.dtype, used: list[int], gen: torch.Generator):
    """Stacked A/B with mixed true ranks (zero-padded to `rank`); unused slots hold NaN."""
    lora_a = torch.randn(NUM_SLOTS, IN_FEATURES, rank, generator=gen) / IN_FEATURES ** 0.5
    lora_b = torch.randn(NUM_SLOTS, rank, OUT_FEATURES, generator=gen) / rank ** 0.5
    for slot in range(NUM_SLOTS):
        true_rank = max(1, rank >> (slot % 3))
        lora_a[slot, :, true_rank:] = 0
        lora_b[slot, true_rank:] = 0
        if slot not in used:
            lora_a[slot] = float("nan")
            lora_b[slot] = float("nan")
    scales = torch.rand(NUM_SLOTS, generator=gen) * 2
    return lora_a.to(dtype), lora_b.to(dtype), scales


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("batch", [1, 5, 40])
@pytest.mark.parametrize("rank", [4, 16, 64])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_triton_matches_twin(dtype, rank, batch, pattern):
    gen = torch.Generator().manual_seed(case_seed(dtype, rank, batch, pattern))
    indices = _indices(pattern, batch, gen)
    lora_a, lora_b, scales = _weights(rank, DTYPES[dtype], indices.unique().tolist(), gen)
    x = torch.randn(batch, IN_FEATURES, generator=gen).to(DTYPES[dtype])
    y0 = torch.randn(batch, OUT_FEATURES, generator=gen).to(DTYPES[dtype])
    base = indices < 0
    x[base] = float("nan")  # rows without an adapter must never be read

    expected = lora_reference(y0.clone(), x, lora_a, lora_b, scales, indices)
    y = y0.clone()
    got = lora_triton(y, x, lora_a, lora_b, scales, indices.int())
    assert got is y
    assert torch.equal(got[base], y0[base])
    assert rel_err(got, expected) <= TOLERANCE[DTYPES[dtype]]


def test_twin_matches_per_row_loop():
    gen = torch.Generator().manual_seed(case_seed("loop"))
    indices = torch.tensor([2, -1, 0, 2, 5, -1, 0])
    lora_a, lora_b, scales = _weights(16, torch.float64, indices.unique().tolist(), gen)
    x = torch.randn(7, IN_FEATURES, generator=gen, dtype=torch.float64)
    y0 = torch.randn(7, OUT_FEATURES, generator=gen, dtype=torch.float64)
    expected = y0.clone()
    for i, slot in enumerate(indices.tolist()):
        if slot >= 0:
            expected[i] += scales[slot] * (x[i] @ lora_a[slot]) @ lora_b[slot]
    got = lora_reference(y0.clone(), x, lora_a, lora_b, scales, indices)
    assert rel_err(got, expected) <= 1e-6


def test_triton_on_strided_y_rows():
    # y as a column slice of a fused output (e.g. the q part of qkv): row stride > out.
    gen = torch.Generator().manual_seed(case_seed("strided"))
    indices = torch.tensor([1, 0, -1, 1])
    lora_a, lora_b, scales = _weights(8, torch.float32, [0, 1], gen)
    x = torch.randn(4, IN_FEATURES, generator=gen)
    fused = torch.randn(4, OUT_FEATURES + 32, generator=gen)
    expected = lora_reference(fused[:, :OUT_FEATURES].clone(), x, lora_a, lora_b, scales,
                              indices)
    tail = fused[:, OUT_FEATURES:].clone()
    lora_triton(fused[:, :OUT_FEATURES], x, lora_a, lora_b, scales, indices)
    assert rel_err(fused[:, :OUT_FEATURES], expected) <= TOLERANCE[torch.float32]
    assert torch.equal(fused[:, OUT_FEATURES:], tail)


@pytest.mark.parametrize("pattern", ["single", "mixed", "with_base_rows"])
def test_grouped_cpu_path_equals_twin(pattern):
    from kernels.lora import group_rows, lora_grouped

    gen = torch.Generator().manual_seed(7)
    num_slots, max_rank, din, dout, rows = 4, 16, 24, 40, 11
    ranks = {0: 4, 1: 16, 2: 8, 3: 2}
    a = torch.randn(num_slots, din, max_rank, generator=gen)
    b = torch.randn(num_slots, max_rank, dout, generator=gen)
    for slot, r in ranks.items():  # zero padding past each adapter's rank, as the registry stores it
        a[slot, :, r:] = 0
        b[slot, r:, :] = 0
    scales = torch.rand(num_slots, generator=gen)
    idx = {"single": [2] * rows, "mixed": [i % 4 for i in range(rows)],
           "with_base_rows": [-1, 1, 1, -1, 3, 0, -1, 2, 2, 1, -1]}[pattern]
    x = torch.randn(rows, din, generator=gen)
    y0 = torch.randn(rows, dout, generator=gen)
    expected = lora_reference(y0.clone(), x, a, b, scales, torch.tensor(idx))
    got = lora_grouped(y0.clone(), x, a, b, scales, group_rows(idx, ranks))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
