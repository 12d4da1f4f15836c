"""The C++ decoder stack (server.models.cpu_stack) against the Python layers it replaces.

It calls the same kernels and linears in the same order, so the oracle is exact: for a decode
step its hidden states and every KV cache it writes must equal, bit for bit, those of
`CausalLM`'s Python layers on copies of the same caches. Tiny random-weight models cover GQA,
a qkv bias (Qwen2), per-layer sliding windows shorter than the contexts, bf16 (packed oneDNN
weights where the CPU multiplies bf16 natively, plain ones elsewhere) and fp16.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from kernels import cpu_ext
from kernels.lora import LoRAGroup
from kernels.paged_attention_cpu import plan_attention
from server.models import cpu_stack
from server.models.config import ModelConfig
from server.models.linear import PackedLinear, prepare_linears
from server.models.llama import FINAL_NORM_TAP, AttentionMetadata, CausalLM

pytestmark = pytest.mark.skipif(cpu_ext.load() is None, reason="no C++ compiler: the stack does not exist")
BLOCK = 4
NUM_BLOCKS = 192


def tiny_model(dtype: torch.dtype, bias: bool, windows: tuple[int | None, ...], seed: int = 0) -> CausalLM:
    config = ModelConfig(model_type="qwen2" if bias else "llama", vocab_size=300, hidden_size=64,
                         intermediate_size=96, num_layers=len(windows), num_heads=4, num_kv_heads=2, head_dim=16,
                         rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=True,
                         attention_bias=bias, sliding_windows=windows,
                         inv_freq=tuple(1.0 / 10000 ** (i / 8) for i in range(8)), rope_attention_scaling=1.0,
                         bos_token_id=None, eos_token_ids=(0,))
    torch.manual_seed(seed)
    model = CausalLM(config)
    with torch.no_grad():  # norms away from 1 so a skipped or swapped norm weight shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.5)
    return model.to(dtype).eval()


def decode_step(model: CausalLM, contexts: list[int], seed: int):
    """One decode token per sequence over random caches: (ids, positions, caches, meta)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    caches = [tuple(torch.randn(NUM_BLOCKS, BLOCK, cfg.num_kv_heads, cfg.head_dim, generator=gen).to(model.dtype)
                    for _ in range(2)) for _ in range(cfg.num_layers)]
    perm = torch.randperm(NUM_BLOCKS - 1, generator=gen) + 1  # scattered blocks, block 0 unused
    width = max(-(-c // BLOCK) for c in contexts)
    tables, used = [], 0
    for c in contexts:
        n = -(-c // BLOCK)
        tables.append(perm[used:used + n].tolist() + [0] * (width - n))
        used += n
    tables_t = torch.tensor(tables, dtype=torch.int32)
    slots = torch.tensor([tables[b][(c - 1) // BLOCK] * BLOCK + (c - 1) % BLOCK for b, c in enumerate(contexts)])
    starts = list(range(len(contexts) + 1))
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables_t,
                             seq_lens=torch.tensor(contexts, dtype=torch.int32),
                             query_start_locs=torch.tensor(starts, dtype=torch.int32))
    meta.cpu_plan = plan_attention(tables_t, contexts, starts, BLOCK)
    ids = torch.randint(1, cfg.vocab_size, (len(contexts),), generator=gen)
    return ids, torch.tensor([c - 1 for c in contexts]), caches, meta


def run(model: CausalLM, stack, step):
    ids, positions, caches, meta = step
    caches = copy.deepcopy(caches)
    model.cpu_stack = stack
    with torch.inference_mode():
        hidden, taps = model(ids, positions, caches, meta)
    return hidden, caches


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("dtype", "packed"), [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, False)])
def test_stack_equals_the_python_layers_bitwise(dtype, bias, packed):
    model = tiny_model(dtype, bias, windows=(None, 7, None, 12))
    if packed:
        prepare_linears(model)
        if not isinstance(model.layers[0].attention.wqkv, PackedLinear):
            pytest.skip("oneDNN packs bf16 only where the CPU multiplies bf16 natively")
    stack = cpu_stack.build(model)
    assert stack is not None
    small_rows = model.layers[0].attention.wqkv.small_rows if packed else 0
    assert not packed or small_rows in (4, 16)  # the VDPBF16PS passes' limit, or AMX tiles'
    # 1 and 3 rows take PackedLinear's small-M kernels, 8 and 12 rows too on AMX (else oneDNN),
    # 20 and 70 rows oneDNN.
    for seed, contexts in enumerate(([1], [5, 17, 30], [33, 2, 9, 16, 41, 4, 25, 13],
                                     [7, 19, 3, 28, 11, 40, 1, 22, 15, 9, 33, 6],
                                     [1 + (5 * i) % 13 for i in range(20)], [1 + (3 * i) % 5 for i in range(70)])):
        step = decode_step(model, contexts, seed)
        ours, our_caches = run(model, stack, step)
        ref, ref_caches = run(model, None, step)
        assert ours.shape == ref.shape == (len(contexts), model.config.hidden_size)
        assert torch.isfinite(ref.float()).all()
        assert torch.equal(ours, ref), (contexts, (ours.float() - ref.float()).abs().max())
        for layer, ((k, v), (k_ref, v_ref)) in enumerate(zip(our_caches, ref_caches)):
            assert torch.equal(k, k_ref) and torch.equal(v, v_ref), (contexts, layer)
        assert not torch.equal(our_caches[0][0], step[2][0][0]), "the step must write its keys"


def test_stack_is_built_only_where_it_can_serve():
    assert cpu_stack.build(tiny_model(torch.float32, False, (None, None))) is None  # no 16-bit cache kernel
    model = tiny_model(torch.bfloat16, False, (None, None))
    prepare_linears(model, "int8")
    assert cpu_stack.build(model) is None  # quantized projections stay in Python


def test_steps_it_does_not_take_keep_the_python_layers():
    model = tiny_model(torch.bfloat16, False, (None, 7))
    stack = cpu_stack.build(model)
    _, _, caches, meta = decode_step(model, [5, 9], 0)
    assert stack.takes(meta, 2, 2, frozenset(), caches)
    assert not stack.takes(meta, 2, 32, frozenset(), caches)  # padding rows
    assert not stack.takes(meta, 2, 2, frozenset({FINAL_NORM_TAP}), caches)  # taps
    f32_caches = [(k.float(), v.float()) for k, v in caches]
    assert not stack.takes(meta, 2, 2, frozenset(), f32_caches)
    meta.kernel_backend = "torch"
    assert not stack.takes(meta, 2, 2, frozenset(), caches)
    meta.kernel_backend = "auto"
    meta.lora = lora_batch(model, [0, 1], rank_major=True, stack_dtype=torch.float32, seed=0)
    assert stack.takes(meta, 2, 2, frozenset(), caches)  # the C++ BGMV route's plan
    meta.lora = dataclasses.replace(meta.lora, backend="torch")
    assert not stack.takes(meta, 2, 2, frozenset(), caches)
    # A dense group (one slot's rows through its own pair of matmuls): the torch route's plan.
    meta.lora = dataclasses.replace(meta.lora, backend="auto", groups=[LoRAGroup(0, None, 8)])
    assert not stack.takes(meta, 2, 2, frozenset(), caches)
    meta.lora = None
    # A prefill chunk in the step (one sequence feeds 3 tokens): not all rows decode.
    tables = torch.tensor([[1, 2, 0], [3, 4, 5]], dtype=torch.int32)
    mixed = AttentionMetadata(slot_mapping=torch.tensor([4, 13, 14, 15]), block_tables=tables,
                              seq_lens=torch.tensor([5, 11], dtype=torch.int32),
                              query_start_locs=torch.tensor([0, 1, 4], dtype=torch.int32))
    mixed.cpu_plan = plan_attention(tables, [5, 11], [0, 1, 4], BLOCK)
    assert not stack.takes(mixed, 4, 4, frozenset(), caches)


def lora_batch(model: CausalLM, indices: list[int], rank_major: bool, stack_dtype: torch.dtype, seed: int):
    """Random adapters in 3 slots (true ranks 8 / 3 / 5 of max 8) on every module of every layer
    but layer 1's k, stored as the registry stores them on CPU (A rank-major underneath)."""
    from kernels.dispatch import lora_plan
    from server.models.llama import LoRABatch

    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    hidden, q_size, kv_size = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    sizes = {"q": (hidden, q_size), "k": (hidden, kv_size), "v": (hidden, kv_size), "o": (q_size, hidden),
             "gate": (hidden, cfg.intermediate_size), "up": (hidden, cfg.intermediate_size),
             "down": (cfg.intermediate_size, hidden)}
    ranks = {0: 8, 1: 3, 2: 5}
    table = {}
    for layer in range(cfg.num_layers):
        for module, (fan_in, fan_out) in sizes.items():
            if (layer, module) == (1, "k"):
                continue
            a = torch.randn(3, 8, fan_in, generator=gen) / fan_in ** 0.5
            b = torch.randn(3, 8, fan_out, generator=gen)
            for slot, rank in ranks.items():  # padding ranks are zero, as the registry keeps them
                a[slot, rank:] = 0
                b[slot, rank:] = 0
            a = a.to(stack_dtype)
            lora_a = a.transpose(1, 2) if rank_major else a.transpose(1, 2).contiguous()
            table[(layer, module)] = (lora_a, b.to(stack_dtype), torch.rand(3, generator=gen) + 0.5)
    groups = lora_plan(indices, ranks, torch.device("cpu"), model.dtype)
    return LoRABatch(torch.tensor(indices), lambda layer, module: table.get((layer, module)), "auto", groups)


@pytest.mark.parametrize("stack_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_stack_with_adapter_rows_equals_the_python_layers_bitwise(stack_dtype, packed):
    """Adapter rows in a decode step: the stack adds each projection's delta through the same
    C++ BGMV the Python layers call (kernels.lora's C++ route), in the same places."""
    model = tiny_model(torch.bfloat16, True, windows=(None, 7, None))
    if packed:
        prepare_linears(model)
        if not isinstance(model.layers[0].attention.wqkv, PackedLinear):
            pytest.skip("oneDNN packs bf16 only where the CPU multiplies bf16 natively")
    stack = cpu_stack.build(model)
    for seed, (contexts, indices) in enumerate((([9], [1]), ([5, 17, 30], [0, -1, 2]),
                                                 ([33, 2, 9, 16, 41, 4, 25, 13], [2, 2, -1, 0, 1, -1, 0, 2]))):
        ids, positions, caches, meta = decode_step(model, contexts, seed)
        meta.lora = lora_batch(model, indices, rank_major=True, stack_dtype=stack_dtype, seed=seed)
        step = (ids, positions, caches, meta)
        assert stack.takes(meta, len(contexts), len(contexts), frozenset(), caches)
        with torch.inference_mode():
            assert stack.forward(model, ids, positions, copy.deepcopy(caches), meta) is not None
        ours, our_caches = run(model, stack, step)
        ref, ref_caches = run(model, None, step)
        assert torch.equal(ours, ref), (contexts, (ours.float() - ref.float()).abs().max())
        for (k, v), (k_ref, v_ref) in zip(our_caches, ref_caches):
            assert torch.equal(k, k_ref) and torch.equal(v, v_ref), contexts
        meta.lora = None  # the adapters must change the step, or the comparison above shows nothing
        base, _ = run(model, None, step)
        assert not torch.equal(base, ref), contexts


def test_adapter_stacks_off_the_cpp_route_keep_the_python_layers():
    model = tiny_model(torch.bfloat16, False, windows=(None, None))
    stack = cpu_stack.build(model)
    ids, positions, caches, meta = decode_step(model, [5, 9], 0)
    meta.lora = lora_batch(model, [0, 1], rank_major=False, stack_dtype=torch.float32, seed=0)
    with torch.inference_mode():
        assert stack.forward(model, ids, positions, caches, meta) is None


def test_adapter_stacks_kept_per_registry_layout_follow_loads_and_evictions():
    """The stack keeps a step's adapter stacks while the registry's layout_version holds. Loads
    that target new modules, an eviction whose slot is refilled in place, and a wider adapter
    that makes the registry grow (new tensors for every stack) must reach it: each step equals
    the Python layers (which fetch the stacks every step) bit for bit."""
    from adapters.peft_format import MODULES
    from adapters.registry import AdapterRegistry
    from kernels.dispatch import lora_plan
    from server.models.llama import LoRABatch
    from tests.adapters.helpers import fake_weights

    model = tiny_model(torch.bfloat16, False, windows=(None, 7))
    stack = cpu_stack.build(model)
    registry = AdapterRegistry(model.config, max_loras=2, max_rank=16, dtype=torch.bfloat16)
    ids = {}
    adapters = (("qv", ("q", "v"), 4), ("all", MODULES, 8), ("mlp", ("gate", "down"), 2), ("wide", MODULES, 12))
    for seed, (name, modules, rank) in enumerate(adapters):
        weights = fake_weights(model.config, name, modules, rank, seed)
        for key, (a, b) in weights.weights.items():  # deltas the size of the base's, not far beyond
            weights.weights[key] = (a / a.shape[0] ** 0.5, b / rank ** 0.5)
        ids[name] = registry.add(name, weights)

    def step(active: list[str], seed: int) -> None:
        for name in active:
            assert registry.acquire(ids[name])
        indices = [registry.slot_of(ids[name]) for name in active] + [-1]
        ranks = {registry.slot_of(ids[n]): registry.by_id(ids[n]).weights.rank for n in active}
        contexts = [5 + 7 * i for i in range(len(indices))]
        ids_, positions, caches, meta = decode_step(model, contexts, seed)
        meta.lora = LoRABatch(torch.tensor(indices), registry.stacks, "auto",
                              lora_plan(indices, ranks, torch.device("cpu"), model.dtype), registry.layout_version)
        ours, _ = run(model, stack, (ids_, positions, caches, meta))
        ref, _ = run(model, None, (ids_, positions, caches, meta))
        assert torch.isfinite(ref.float()).all()
        assert torch.equal(ours, ref), (active, (ours.float() - ref.float()).abs().max())
        for name in active:
            registry.release(ids[name])

    version = registry.layout_version
    step(["qv"], 0)
    step(["qv"], 1)  # the same layout: the kept lists serve
    assert registry.layout_version == version + 1
    step(["qv", "all"], 2)  # "all" targets k, o, gate, up, down for the first time
    step(["all", "mlp"], 3)  # "mlp" evicts "qv" (2 slots) and is copied into its slot in place
    assert registry.num_evictions == 1 and registry.layout_version == version + 4
    assert registry.stack_rank == 8
    step(["mlp", "wide"], 4)  # "wide" evicts "all" and grows every stack to 16 ranks
    assert registry.stack_rank == 16 and registry.num_evictions == 2 and registry.layout_version == version + 6
