"""AdapterRegistry: ids, exact slot ids, LRU eviction order, refcounts, stacks and counters."""
from __future__ import annotations

import pytest
import torch

from adapters.peft_format import AdapterError
from adapters.registry import RANK_STEP, AdapterRegistry, stack_dtype
from tests.adapters.helpers import fake_weights, model_config


@pytest.fixture(scope="module")
def config():
    return model_config()


def make(config, max_loras: int = 2, max_rank: int = 8, **adapters: tuple[str, ...]) -> tuple[AdapterRegistry, dict]:
    """A registry with adapters named by kwargs (value = targeted modules); returns name -> id."""
    registry = AdapterRegistry(config, max_loras=max_loras, max_rank=max_rank)
    ids = {name: registry.add(name, fake_weights(config, name, modules, seed=i))
           for i, (name, modules) in enumerate(adapters.items())}
    return registry, ids


ATTN = ("q", "k", "v", "o")


def test_ids_start_at_one_and_are_never_reused(config):
    registry, ids = make(config, a=ATTN, b=ATTN)
    assert ids == {"a": 1, "b": 2}
    registry.remove("a")
    assert registry.add("a", fake_weights(config, "a")) == 3
    assert registry.add("c", fake_weights(config, "c")) == 4
    assert registry.names() == ["b", "a", "c"]
    assert registry.get("a").adapter_id == 3 and registry.by_id(1) is None and registry.get("zz") is None


def test_duplicate_name_and_oversized_rank_are_400(config):
    registry, _ = make(config, a=ATTN)
    with pytest.raises(AdapterError) as info:
        registry.add("a", fake_weights(config, "a"))
    assert (info.value.status, info.value.param) == (400, "lora_name")
    with pytest.raises(AdapterError, match="rank 16 exceeds --max-lora-rank 8") as info:
        registry.add("big", fake_weights(config, "big", rank=16))
    assert info.value.status == 400


def test_base_model_is_id_zero(config):
    registry, _ = make(config)
    assert registry.acquire(0) and registry.slot_of(0) == -1
    registry.release(0)
    assert registry.resident() == {} and registry.num_loads == 0


def test_slots_fill_lowest_first_and_lru_idle_adapter_is_evicted(config):
    registry, ids = make(config, max_loras=2, a=ATTN, b=ATTN, c=ATTN)
    a, b, c = ids["a"], ids["b"], ids["c"]
    assert registry.acquire(a) and registry.acquire(b)
    assert (registry.slot_of(a), registry.slot_of(b)) == (0, 1)
    registry.release(a)
    registry.release(b)  # a is now least recently used
    assert registry.acquire(c) and registry.slot_of(c) == 0
    assert registry.resident() == {0: c, 1: b}
    registry.release(c)  # b is now least recently used
    assert registry.acquire(a) and registry.slot_of(a) == 1
    assert registry.resident() == {0: c, 1: a}
    # Re-acquiring a resident adapter costs no load.
    assert registry.acquire(a) and registry.slot_of(a) == 1
    assert (registry.num_loads, registry.num_evictions, registry.num_unloads) == (4, 2, 0)


def test_in_use_adapter_is_never_evicted(config):
    registry, ids = make(config, max_loras=2, a=ATTN, b=ATTN, c=ATTN)
    a, b, c = ids["a"], ids["b"], ids["c"]
    assert registry.acquire(a) and registry.acquire(b)  # a is older, but stays in use
    registry.release(b)
    assert registry.acquire(c) and registry.slot_of(c) == 1
    assert registry.resident() == {0: a, 1: c} and registry.get("a").refcount == 1


def test_acquire_returns_false_when_every_slot_is_in_use(config):
    registry, ids = make(config, max_loras=2, a=ATTN, b=ATTN, c=ATTN)
    assert registry.acquire(ids["a"]) and registry.acquire(ids["b"])
    assert not registry.acquire(ids["c"])
    assert registry.get("c").refcount == 0 and registry.get("c").slot == -1
    assert registry.resident() == {0: ids["a"], 1: ids["b"]} and registry.num_evictions == 0
    with pytest.raises(RuntimeError, match="not resident"):
        registry.slot_of(ids["c"])
    registry.release(ids["b"])
    assert registry.acquire(ids["c"]) and registry.slot_of(ids["c"]) == 1


def test_remove_in_use_is_409_unknown_is_404(config):
    registry, ids = make(config, a=ATTN)
    assert registry.acquire(ids["a"]) and registry.acquire(ids["a"])
    with pytest.raises(AdapterError, match="in use by 2") as info:
        registry.remove("a")
    assert (info.value.status, info.value.param) == (409, "lora_name")
    registry.release(ids["a"])
    registry.release(ids["a"])
    registry.remove("a")
    assert registry.resident() == {} and registry.num_unloads == 1
    with pytest.raises(AdapterError) as info:
        registry.remove("a")
    assert info.value.status == 404
    with pytest.raises(AdapterError) as info:
        registry.acquire(ids["a"])  # removed while a request waited
    assert info.value.status == 404


def test_release_without_acquire_is_a_bug(config):
    registry, ids = make(config, a=ATTN)
    with pytest.raises(RuntimeError):
        registry.release(ids["a"])


def test_stacks_hold_padded_weights_and_only_targeted_modules(config):
    registry, ids = make(config, max_loras=2, max_rank=8, attn=ATTN, mlp=("gate", "up", "down"),
                        v_only=("v",))
    assert registry.stacks(0, "q") is None
    assert registry.acquire(ids["attn"])
    assert registry.stacks(0, "gate") is None  # nothing resident targets the MLP
    lora_a, lora_b, scales = registry.stacks(1, "k")
    assert (lora_a.shape, lora_b.shape, scales.shape) == ((2, 32, 8), (2, 8, 32), (2,))
    assert lora_a.transpose(1, 2).is_contiguous()  # rank-major on CPU, for the gathered LoRA path
    a, b = registry.get("attn").weights.weights[(1, "k")]
    assert torch.equal(lora_a[0, :, :4], a) and torch.equal(lora_b[0, :4], b)
    assert not lora_a[0, :, 4:].any() and not lora_b[0, 4:].any() and not lora_a[1].any()
    assert scales.tolist() == [2.0, 0.0]

    assert registry.acquire(ids["mlp"]) and registry.slot_of(ids["mlp"]) == 1
    gate_a, _, gate_scales = registry.stacks(0, "gate")
    assert gate_a.shape == (2, 32, 8) and not gate_a[0].any() and gate_a[1].any()
    assert gate_scales.tolist() == [0.0, 2.0]
    assert not registry.stacks(0, "q")[0][1].any()  # the MLP adapter's attention rows are zero

    # Evicting the attention adapter zeroes its rows and hides the stacks no one targets now.
    registry.release(ids["attn"])
    registry.release(ids["mlp"])
    assert registry.acquire(ids["v_only"]) and registry.slot_of(ids["v_only"]) == 0
    assert registry.stacks(1, "k") is None and registry.stacks(0, "gate") is not None
    assert registry.stacks(0, "v") is not None
    assert not lora_a.any() and not scales.any()


def test_stacks_grow_to_the_largest_resident_rank_and_keep_what_they_hold(config):
    """Stacks hold ranks in steps of RANK_STEP up to the largest adapter made resident (capped at
    max_rank), not max_rank from the start; growing copies every slot and changes the layout."""
    registry, ids = make(config, max_loras=3, max_rank=64, small=ATTN)
    ids["wide"] = registry.add("wide", fake_weights(config, "wide", ("q", "gate"), rank=RANK_STEP + 3, seed=7))
    assert registry.acquire(ids["small"])
    assert registry.stack_rank == RANK_STEP and registry.stacks(0, "q")[0].shape == (3, 32, RANK_STEP)
    kept = registry.stacks(0, "q")

    assert registry.acquire(ids["wide"])
    assert registry.stack_rank == 2 * RANK_STEP
    for layer in range(config.num_layers):
        for module, name in (("q", "small"), ("k", "small"), ("q", "wide"), ("gate", "wide")):
            lora_a, lora_b, _ = registry.stacks(layer, module)
            assert lora_a.shape[2] == lora_b.shape[1] == 2 * RANK_STEP
            assert lora_a.transpose(1, 2).is_contiguous()
            slot = registry.slot_of(ids[name])
            a, b = registry.get(name).weights.weights[(layer, module)]
            rank = a.shape[1]
            assert torch.equal(lora_a[slot, :, :rank], a) and torch.equal(lora_b[slot, :rank], b)
            assert not lora_a[slot, :, rank:].any() and not lora_b[slot, rank:].any()
    assert registry.stacks(0, "q")[0] is not kept[0] and registry.stacks(0, "q")[2] is kept[2]

    # A smaller adapter loads into the stacks as they are: no new tensors, no regrowth.
    ids["third"] = registry.add("third", fake_weights(config, "third", ATTN, rank=2, seed=9))
    grown = registry.stacks(1, "k")
    assert registry.acquire(ids["third"]) and registry.stacks(1, "k")[0] is grown[0]
    assert registry.stack_rank == 2 * RANK_STEP

    capped = AdapterRegistry(config, max_loras=1, max_rank=RANK_STEP + 3)
    assert capped.acquire(capped.add("wide", fake_weights(config, "wide", ("q",), rank=RANK_STEP + 3)))
    assert capped.stack_rank == RANK_STEP + 3  # never past --max-lora-rank


def test_module_scaling_reaches_the_slot(config):
    registry = AdapterRegistry(config, max_loras=1, max_rank=4)
    w = fake_weights(config, "p", ("q", "v"), scaling=2.0)
    w.module_scaling[(1, "v")] = 0.25
    assert registry.acquire(registry.add("p", w))
    assert registry.stacks(0, "v")[2].item() == 2.0 and registry.stacks(1, "v")[2].item() == 0.25


def test_lora_dtype_auto_follows_the_model_where_the_cpp_bgmv_runs_and_an_explicit_one_must_fit_it():
    from kernels import cpu_ext

    cpu = torch.device("cpu")
    assert stack_dtype("auto", torch.float32, cpu) == torch.float32
    # 16-bit stacks only where the C++ BGMV widens them in registers; the torch route would copy.
    native = cpu_ext.load() is not None
    assert stack_dtype("auto", torch.bfloat16, cpu) == (torch.bfloat16 if native else torch.float32)
    assert stack_dtype("auto", torch.float16, cpu) == (torch.float16 if native else torch.float32)
    assert stack_dtype("auto", torch.float64, cpu) == torch.float64  # oracle tests
    assert stack_dtype("auto", torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    assert stack_dtype("float32", torch.bfloat16, cpu) == torch.float32
    assert stack_dtype("bfloat16", torch.bfloat16, cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="float32 or the model's dtype"):
        stack_dtype("bfloat16", torch.float32, cpu)


def test_serve_refuses_a_lora_dtype_the_model_cannot_take():
    from typer.testing import CliRunner

    from server.cli import app

    result = CliRunner().invoke(app, ["serve", "--dtype", "float32", "--lora-dtype", "float16", "--port", "1"])
    assert result.exit_code == 2 and "--lora-dtype float16" in result.output
