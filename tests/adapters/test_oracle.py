"""Oracle: our A/B/scaling == PEFT's LoRA forward, module by module, alone and through the
registry's padded slot stacks + `kernels.dispatch.lora_apply` with mixed rows (twin and the
planned CPU path: dense groups and the BGMV gather)."""
from __future__ import annotations

import pytest
import torch

from adapters.peft_format import MODULES, load_peft_adapter, module_shape
from adapters.registry import AdapterRegistry
from kernels.dispatch import lora_apply, lora_plan
from kernels.lora import GATHER_MAX_ROWS, group_rows
from tests.adapters.helpers import (
    ATTENTION,
    base_model,
    fake_weights,
    hf_module,
    lora_config,
    model_config,
    save_adapter,
)

ADAPTERS = {
    "all_linear_r4": lora_config(r=4, alpha=8, targets="all-linear"),
    "attention_rslora_r8": lora_config(r=8, alpha=16, targets=ATTENTION, use_rslora=True),
    "patterns": lora_config(r=6, alpha=12, targets=["q_proj", "v_proj", "down_proj"],
                            rank_pattern={"down_proj": 3}, alpha_pattern={"layers.0.self_attn.q_proj": 5}),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """name -> (PEFT model, LoRAWeights) over one shared base."""
    base, config = base_model(seed=0), model_config()
    out = {}
    for i, (name, peft_config) in enumerate(ADAPTERS.items()):
        path = tmp_path_factory.mktemp(name)
        model = save_adapter(path, peft_config, base, seed=10 + i)
        out[name] = (model, load_peft_adapter(path, config, max_rank=16, name=name))
    return out


def _x(rows: int, in_f: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, in_f, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_delta_matches_peft_module(adapters, name):
    model, w = adapters[name]
    lora_modules = {(layer, m) for layer in range(2) for m in MODULES
                    if hasattr(hf_module(model, layer, m), "lora_A")}
    assert set(w.weights) == lora_modules
    for i, (layer, module) in enumerate(sorted(w.weights)):
        peft_module = hf_module(model, layer, module)
        x = _x(5, peft_module.in_features, seed=i)
        a, b = w.weights[(layer, module)]
        ours = x @ peft_module.base_layer.weight.T + w.scaling_of(layer, module) * (x @ a) @ b
        with torch.no_grad():
            expected = peft_module(x)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


# None: the twin; "native": the planned CPU route as the runner plans it (the C++ BGMV where built)
@pytest.mark.parametrize("gather_max_rows", [None, 0, GATHER_MAX_ROWS, 10**6, "native"])
def test_registry_slots_with_kernel_match_peft_mixed_rows(adapters, gather_max_rows):
    """Rows of the base model (-1) and three adapters share one lora_apply call per module."""
    registry = AdapterRegistry(model_config(), max_loras=4, max_rank=16)
    slot = {}
    for name in ADAPTERS:
        adapter_id = registry.add(name, adapters[name][1])
        assert registry.acquire(adapter_id)
        slot[name] = registry.slot_of(adapter_id)
    assert sorted(slot.values()) == [0, 1, 2]
    row_adapters = [None, "all_linear_r4", "attention_rslora_r8", "patterns", "all_linear_r4", None,
                    "patterns", "attention_rslora_r8"]
    indices = torch.tensor([-1 if a is None else slot[a] for a in row_adapters])
    ranks = {slot[a]: adapters[a][1].rank for a in slot}
    backend = "auto" if gather_max_rows == "native" else "torch"
    if gather_max_rows == "native":
        groups = lora_plan(indices.tolist(), ranks, torch.device("cpu"), torch.float32, backend)
    else:
        groups = None if gather_max_rows is None else group_rows(indices.tolist(), ranks, gather_max_rows)
    base = adapters["all_linear_r4"][0]
    for layer in range(2):
        for module in MODULES:
            stacks = registry.stacks(layer, module)
            assert stacks is not None  # the all-linear adapter targets every module
            weight = hf_module(base, layer, module).base_layer.weight
            x = _x(len(row_adapters), module_shape(registry.model_config, module)[0], seed=layer * 7 + 1)
            y = lora_apply(x @ weight.T, x, *stacks, indices, backend=backend, groups=groups)
            with torch.no_grad():
                expected = torch.stack([
                    x[i] @ weight.T if a is None else hf_module(adapters[a][0], layer, module)(x[i:i + 1])[0]
                    for i, a in enumerate(row_adapters)])
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_padding_to_the_stack_rank_changes_nothing(adapters):
    """A rank-4 adapter in stacks of 4 ranks and in stacks a rank-32 adapter grew to 32 gives the
    same rows."""
    w = adapters["all_linear_r4"][1]
    outputs = []
    for max_rank in (4, 64):
        registry = AdapterRegistry(model_config(), max_loras=2, max_rank=max_rank)
        if max_rank == 64:
            assert registry.acquire(registry.add("wide", fake_weights(model_config(), "wide", rank=32)))
            assert registry.stacks(1, "down")[1].shape[1] == 32
            registry.release(registry.get("wide").adapter_id)
        adapter_id = registry.add("a", w)
        assert registry.acquire(adapter_id)
        x = _x(6, 48, seed=3)
        indices = torch.tensor([registry.slot_of(adapter_id), -1] * 3)
        outputs.append(lora_apply(torch.zeros(6, 32), x, *registry.stacks(1, "down"), indices, backend="torch"))
    # Zero ranks add exact zeros; only BLAS blocking could reorder the sum.
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-6, atol=1e-7)
    assert torch.all(outputs[0][1::2] == 0)
