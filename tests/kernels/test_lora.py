"""Batched LoRA: Triton (interpreted) == torch twin over dtype x rank x batch x popularity, and
the planned CPU path (dense groups + BGMV gather, torch or C++) == a float64 oracle."""
from __future__ import annotations

import pytest
import torch

from kernels import cpu_ext, dispatch
from kernels.lora import GATHER_MAX_ROWS, group_rows, lora_grouped, lora_reference, lora_triton
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


def test_group_rows_gathers_slots_with_few_rows():
    # Slot 3 has a 3-row run (a prefill chunk): its own group; slots 5 and 7 are gathered.
    indices = [-1, 3, 3, 3, 5, -1, 7]
    groups = group_rows(indices, {3: 4, 5: 2, 7: 8}, gather_max_rows=3)
    assert [g.slots for g in groups[:1]] == [3] and groups[0].rows.tolist() == [1, 2, 3]
    assert groups[0].rank == 4
    assert groups[1].slots.tolist() == [5, 7] and groups[1].rows.tolist() == [4, 6]
    assert groups[1].rank == 8 and len(groups) == 2
    # One slot alone is never gathered; a step where every row is one slot has no row ids.
    assert [(g.slots, g.rows.tolist()) for g in group_rows([-1, 2], {2: 4})] == [(2, [1])]
    assert [(g.slots, g.rows) for g in group_rows([2, 2], {2: 4})] == [(2, None)]
    (gathered,) = group_rows([4, 1, 0], {0: 2, 1: 2, 4: 2})
    assert gathered.slots.tolist() == [4, 1, 0] and gathered.rows is None
    # gather_max_rows=None: every adapter row in one group, a lone slot and long runs included.
    (everything,) = group_rows(indices, {3: 4, 5: 2, 7: 8}, gather_max_rows=None)
    assert everything.slots.tolist() == [3, 3, 3, 5, 7] and everything.rows.tolist() == [1, 2, 3, 4, 6]
    assert everything.rank == 8
    (lone,) = group_rows([2, 2], {2: 4}, gather_max_rows=None)
    assert lone.slots.tolist() == [2, 2] and lone.rows is None


PLANNED_SLOTS, PLANNED_IN, PLANNED_OUT, PLANNED_MAX_RANK = 20, 72, 99, 32  # tails past 16-wide vectors
PLANNED_PATTERNS = {  # row -> slot (-1 = base model); 16 adapters resident in 20 slots
    "decode16": [0, -1, 1, 2, 3, -1, 4, 5, 6, 7, 8, -1, 9, 10, 11, 12, 13, -1, 14, 15],
    "decode16_no_base": [15, 3, 0, 7, 12, 1, 9, 4, 14, 2, 11, 6, 13, 8, 5, 10],
    "prefill_and_decode": [-1, 2, 5, 5, -1] + [9] * 12 + [0, 1, 1, 14, -1, 7],
    "one_adapter_and_base": [-1, 6, 6, -1, 6],
    "identical": [11] * 9,
}


def _planned_case(dtype: torch.dtype, layout: str, pattern: str, stack_dtype: torch.dtype | None = None):
    """Stacks (in `stack_dtype`, default `dtype`) with mixed true ranks zero-padded as the
    registry pads them, and NaN wherever no row may read: unused slots and every rank past the
    largest true rank. Values are exactly representable in `dtype`."""
    stack_dtype = stack_dtype or dtype
    gen = torch.Generator().manual_seed(case_seed("planned", dtype, layout, pattern))
    ranks = {s: (2, 4, 8, 12)[s % 4] for s in range(16)}
    a = torch.randn(PLANNED_SLOTS, PLANNED_IN, PLANNED_MAX_RANK, generator=gen, dtype=torch.float64)
    b = torch.randn(PLANNED_SLOTS, PLANNED_MAX_RANK, PLANNED_OUT, generator=gen, dtype=torch.float64)
    for slot, rank in ranks.items():
        a[slot, :, rank:] = 0
        b[slot, rank:] = 0
    a, b = a.to(dtype).double(), b.to(dtype).double()  # exactly representable in `dtype`
    scales = torch.rand(PLANNED_SLOTS, generator=gen) * 2
    poison_a, poison_b = a.clone(), b.clone()
    poison_a[16:], poison_b[16:] = float("nan"), float("nan")
    poison_a[:, :, max(ranks.values()):], poison_b[:, max(ranks.values()):] = float("nan"), float("nan")
    if layout == "rank_major":  # as AdapterRegistry stores lora_a on CPU
        lora_a = poison_a.transpose(1, 2).contiguous().to(stack_dtype).transpose(1, 2)
    else:
        lora_a = poison_a.to(stack_dtype)
    return ranks, (a, b, scales), (lora_a, poison_b.to(stack_dtype), scales)


@pytest.fixture(params=["torch", "cpp"])
def route(request):
    """The gathered rows' route: torch ops, or the C++ BGMV (where the extension builds)."""
    if request.param == "torch":
        return None
    ext = cpu_ext.load()
    if ext is None:
        pytest.skip("no C++ compiler here: the torch route is the only one")
    return ext


# all dense .. all gathered but a lone slot; None: every adapter row gathered (the C++ route's plan)
@pytest.mark.parametrize("gather_max_rows", [0, GATHER_MAX_ROWS, 10**6, None])
@pytest.mark.parametrize("pattern", list(PLANNED_PATTERNS))
@pytest.mark.parametrize("layout", ["rank_major", "standard"])
@pytest.mark.parametrize("dtype,stacks", [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")])
def test_planned_cpu_path_matches_float64_oracle(dtype, stacks, layout, pattern, gather_max_rows, route):
    dtype = DTYPES[dtype]
    indices = PLANNED_PATTERNS[pattern]
    ranks, (a64, b64, scales), stacks = _planned_case(dtype, layout, pattern, DTYPES[stacks])
    gen = torch.Generator().manual_seed(case_seed("planned-x", pattern))
    rows = len(indices)
    x = torch.randn(rows, PLANNED_IN, generator=gen).to(dtype)
    x[torch.tensor(indices) < 0] = float("nan")  # base rows are never read
    # y is the middle column slice of a fused output (e.g. k of qkv); its neighbours stay put.
    fused = torch.randn(rows, PLANNED_OUT + 40, generator=gen).to(dtype)
    y0 = fused.clone()
    y = fused[:, 24:24 + PLANNED_OUT]
    used = {s: r for s, r in ranks.items() if s in indices}

    got = lora_grouped(y, x, *stacks, group_rows(indices, used, gather_max_rows), ext=route)
    assert got is y
    assert torch.equal(fused[:, :24], y0[:, :24]) and torch.equal(fused[:, 24 + PLANNED_OUT:],
                                                                    y0[:, 24 + PLANNED_OUT:])
    base = torch.tensor(indices) < 0
    y_start = y0[:, 24:24 + PLANNED_OUT].double()
    assert torch.equal(got[base].double(), y_start[base])  # base rows: exactly no delta

    x64 = torch.nan_to_num(x.double())
    delta = lora_reference(torch.zeros(rows, PLANNED_OUT, dtype=torch.float64), x64, a64, b64,
                           scales.double(), torch.tensor(indices))
    # Forward error bound: float32 products over in + rank terms, then one rounding into y's
    # dtype (u = 2^-24 for float32, 2^-8 for bfloat16) of y + delta.
    mag = lora_reference(torch.zeros(rows, PLANNED_OUT, dtype=torch.float64), x64.abs(), a64.abs(),
                         b64.abs(), scales.double(), torch.tensor(indices))
    exact = y_start + delta
    err32 = (PLANNED_IN + PLANNED_MAX_RANK + 2) * 2.0 ** -24 * (mag + y_start.abs())
    unit = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}[dtype]
    bound = unit * (exact.abs() + err32) + err32
    err = (got.double() - exact).abs()
    assert torch.isfinite(got).all()
    assert (err[~base] <= bound[~base]).all(), (err - bound).max().item()


@pytest.mark.parametrize("pattern", ["single", "mixed", "with_base_rows"])
def test_grouped_cpu_path_equals_twin(pattern):
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


# 12: ranks four at a time; 6: four, then two one at a time (the remainder path)
@pytest.mark.parametrize("rank", [12, 6])
@pytest.mark.parametrize("stacks", ["fp32", "bf16"])
def test_cpp_bgmv_rows_in_a_tile_equal_rows_alone(stacks, rank, route):
    """Rows of one slot share each weight load in tiles of up to four (a prefill chunk's rows);
    each row's sums still run as they would alone, so its output is bitwise the lone row's. The
    tiles' rows also meet the float64 oracle within the forward error bound."""
    if route is None:
        pytest.skip("the C++ kernel's tiles")
    gen = torch.Generator().manual_seed(17)
    slots_of_rows = [3] * 7 + [1, 3, 3, 0, 0, 0, 0, 0]  # tiles 4 + 3, 1, 2, 4 + 1
    rows, din, dout = len(slots_of_rows), 72, 99
    a = torch.randn(4, rank, din, generator=gen).to(DTYPES[stacks])  # rank-major, as the kernel takes it
    b = torch.randn(4, rank, dout, generator=gen).to(DTYPES[stacks])
    scales = torch.rand(4, generator=gen) + 0.5
    x = torch.randn(rows, din, generator=gen).to(torch.bfloat16)
    y0 = torch.randn(rows, dout, generator=gen).to(torch.bfloat16)
    batched = y0.clone()
    route.lora_bgmv(batched, x, a, b, scales, torch.tensor(slots_of_rows), torch.empty(0, dtype=torch.long), rank)
    assert not torch.equal(batched, y0)
    for i, slot in enumerate(slots_of_rows):
        alone = y0.clone()
        route.lora_bgmv(alone, x, a, b, scales, torch.tensor([slot]), torch.tensor([i]), rank)
        assert torch.equal(alone[i], batched[i]), i
    # Oracle: as in test_planned_cpu_path_matches_float64_oracle, float32 sums over din + rank
    # terms, then one bf16 rounding of y + delta.
    index = torch.tensor(slots_of_rows)
    a64, b64, x64, y64 = a.double()[index], b.double()[index], x.double(), y0.double()
    delta = torch.einsum("ri,rki,rko->ro", x64, a64, b64) * scales.double()[index, None]
    mag = torch.einsum("ri,rki,rko->ro", x64.abs(), a64.abs(), b64.abs()) * scales.double()[index, None]
    err32 = (din + rank + 2) * 2.0 ** -24 * (mag + y64.abs())
    bound = 2.0 ** -8 * ((y64 + delta).abs() + err32) + err32
    assert ((batched.double() - (y64 + delta)).abs() <= bound).all()


def test_cpp_bgmv_refuses_bad_rows_and_slots(route):
    if route is None:
        pytest.skip("the C++ kernel's own checks")
    y, x = torch.zeros(3, 8), torch.randn(3, 4)
    a, b, scales = torch.randn(2, 2, 4), torch.randn(2, 2, 8), torch.ones(2)
    slots = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="distinct"):  # rows are written in parallel
        route.lora_bgmv(y, x, a, b, scales, slots, torch.tensor([1, 1]), 2)
    with pytest.raises(RuntimeError, match="distinct ids in range"):
        route.lora_bgmv(y, x, a, b, scales, slots, torch.tensor([0, 3]), 2)
    with pytest.raises(RuntimeError, match="slot out of range"):
        route.lora_bgmv(y, x, a, b, scales, torch.tensor([0, 2]), torch.tensor([0, 1]), 2)
    with pytest.raises(RuntimeError, match="rank"):
        route.lora_bgmv(y, x, a, b, scales, slots, torch.tensor([0, 1]), 3)
    assert torch.equal(y, torch.zeros(3, 8))  # refused before any write


def test_lora_plan_gathers_every_row_only_where_the_cpp_kernel_runs():
    cpu = torch.device("cpu")
    indices, ranks = [-1, 3, 3, 3, 3, 5], {3: 4, 5: 2}
    twin_plan = [g.slots for g in dispatch.lora_plan(indices, ranks, cpu, torch.float32, backend="torch")]
    assert twin_plan == [3, 5]  # a 4-row run is dense there; a lone gathered slot is not gathered
    # float64 (the oracle dtype) always takes the torch route.
    assert [g.slots for g in dispatch.lora_plan(indices, ranks, cpu, torch.float64)] == [3, 5]
    (native,) = dispatch.lora_plan(indices, ranks, cpu, torch.bfloat16) if cpu_ext.load() else [None]
    if native is not None:
        assert native.slots.tolist() == [3, 3, 3, 3, 5] and native.rows.tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="unknown kernel backend"):
        dispatch.lora_plan(indices, ranks, cpu, torch.float32, backend="cuda")
