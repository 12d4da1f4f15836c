"""Fast linears (server.models.linear) against float64 references of what they store.

Packed bf16 must equal the dense product; int8/int4 must equal the product with their own
dequantized weight (the kernel is exact about what it stores), and the stored weight must be
within half a quantization step of the original (the rounding bound).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from server.models.linear import (
    INT4_GROUP_SIZE,
    Int4Linear,
    Int8Linear,
    PackedLinear,
    prepare_linears,
    quantize_int4,
    quantize_int8,
)
from server.models.config import ModelConfig
from server.models.llama import CausalLM
from tests.kernels.helpers import rel_err

# Output tolerance relative to max|y|: one rounding of the output to the activation dtype
# (bf16: 2^-8) plus bf16 activations when the kernel takes bf16 in, with fp32 accumulation.
BF16_BOUND = 2 * 2.0 ** -8


def _linear(in_features: int, out_features: int, dtype: torch.dtype, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ weight.double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("rows", [1, 5, 16, 64])
def test_packed_bf16_equals_dense(rows):
    lin = _linear(192, 320, torch.bfloat16, bias=True, seed=rows)
    x = torch.randn(rows, 192).to(torch.bfloat16)
    y = PackedLinear(lin)(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 320)
    assert rel_err(y, _reference(x, lin.weight, lin.bias)) <= BF16_BOUND


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_rounding_is_within_half_a_step(scale_dtype):
    w = torch.randn(64, 96, dtype=torch.float64)
    q, scale = quantize_int8(w, scale_dtype)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127 and scale.dtype == scale_dtype
    err = (q.double() * scale.double()[:, None] - w).abs()
    # The float32 input rounding (2^-24 relative) is the only slack.
    assert bool((err <= scale.double()[:, None] / 2 + w.abs() * 2.0 ** -23).all())


def test_int4_rounding_is_within_half_a_step():
    w = torch.randn(48, 4 * INT4_GROUP_SIZE, dtype=torch.float64)
    q, scale, zero = quantize_int4(w, INT4_GROUP_SIZE)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    deq = ((q.double().view(48, 4, -1) - 8) * scale.double()[..., None] + zero.double()[..., None]).view(48, -1)
    steps = scale.double().repeat_interleave(INT4_GROUP_SIZE, dim=1)
    assert bool(((deq - w).abs() <= steps / 2 + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("rows", [1, 7, 32])
def test_quantized_kernel_equals_dequantized_reference(cls, dtype, rows):
    lin = _linear(4 * INT4_GROUP_SIZE, 96, dtype, bias=True, seed=rows)
    layer = cls(lin)
    x = torch.randn(rows, lin.in_features).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (rows, 96)
    # Both take bf16 activations whatever the model dtype (the kernels' fast form).
    assert rel_err(y, _reference(x.to(torch.bfloat16), layer.dequantize(), lin.bias)) <= BF16_BOUND


def tiny_causal_lm() -> CausalLM:
    config = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=64,
                         tie_word_embeddings=True, attention_bias=False, sliding_windows=(None, None),
                         inv_freq=tuple(1.0 / 10000 ** (i / 8) for i in range(8)), rope_attention_scaling=1.0,
                         bos_token_id=None, eos_token_ids=(0,))
    return CausalLM(config)


def test_prepare_linears_swaps_every_projection_and_the_head():
    model = tiny_causal_lm()
    embed = model.embed.weight.detach().clone()
    chosen = prepare_linears(model, "int8")
    assert chosen == {"wqkv": "Int8Linear", "wo": "Int8Linear", "w13": "Int8Linear", "w2": "Int8Linear",
                      "lm_head": "Int8Linear"}
    assert all(isinstance(layer.mlp.w13, Int8Linear) for layer in model.layers)
    assert torch.equal(model.embed.weight, embed), "the tied embedding must keep its dense weights"
    with pytest.raises(ValueError, match="unknown quantization"):
        prepare_linears(tiny_causal_lm(), "int3")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_padding_changes_no_output_and_writes_no_extra_cache_slot(dtype):
    """CausalLM.row_bucket pads a big step's rows for oneDNN's sake; the padding rows must not
    reach attention or the KV cache, and the step's hidden states and taps must not change.
    Rows of a matmul are independent, so the only allowed difference is the GEMM's blocking: a
    different summation order over K <= 128 terms (at most K * 2^-24 relative in float32, which
    a bf16 output rounds away or flips by one ulp, 2^-8), in each of the 2 layers, x2 slack. A
    BLAS that keeps one order for every M (most do) gives 0; the bound holds for any that don't."""
    from kernels.paged_attention_cpu import plan_attention
    from server.models.llama import EMBED_TAP, FINAL_NORM_TAP, AttentionMetadata

    torch.manual_seed(0)
    model = tiny_causal_lm().to(dtype)
    prepare_linears(model)
    lens, block_size = [60, 40], 4
    tables = torch.zeros(2, 15, dtype=torch.int32)  # 15 and 10 blocks, the rest the null block 0
    tables[0] = torch.arange(1, 16)
    tables[1, :10] = torch.arange(16, 26)
    starts = [0, 60, 100]
    positions = torch.cat([torch.arange(n) for n in lens])
    slots = torch.cat([tables[b].long()[torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
                       for b, n in enumerate(lens)])
    ids = torch.randint(1, 256, (100,))

    def run(bucket: int):
        model.row_bucket = bucket
        caches = [(torch.full((27, block_size, 2, 16), float("nan"), dtype=dtype),
                   torch.full((27, block_size, 2, 16), float("nan"), dtype=dtype)) for _ in model.layers]
        meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=torch.tensor(lens, dtype=torch.int32),
                                 query_start_locs=torch.tensor(starts, dtype=torch.int32))
        meta.cpu_plan = plan_attention(tables, lens, starts, block_size)
        with torch.inference_mode():
            hidden, taps = model(ids, positions, caches, meta, frozenset({0, EMBED_TAP, FINAL_NORM_TAP}))
        return hidden, taps, caches

    plain, plain_taps, plain_caches = run(0)
    padded, padded_taps, padded_caches = run(32)  # 100 rows -> 128
    bound = 2 * len(model.layers) * (2.0 ** -8 if dtype == torch.bfloat16 else 128 * 2.0 ** -24)
    assert padded.shape == plain.shape == (100, 64)
    assert rel_err(padded, plain) <= bound
    for key, tap in plain_taps.items():
        assert padded_taps[key].shape == tap.shape and rel_err(padded_taps[key], tap) <= bound
    written = torch.zeros(27 * block_size, dtype=torch.bool)
    written[slots] = True
    for (k0, v0), (k1, v1) in zip(plain_caches, padded_caches):
        for a, b in ((k0, k1), (v0, v1)):
            a, b = a.view(-1, 2, 16), b.view(-1, 2, 16)
            assert b[~written].isnan().all(), "a padding row reached the KV cache"
            assert rel_err(b[written], a[written]) <= bound
