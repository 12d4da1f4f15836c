"""load_peft_adapter: what it reads from PEFT directories and every way it refuses one (400)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adapters.peft_format import AdapterError, load_peft_adapter
from tests.adapters.helpers import ATTENTION, base_model, lora_config, model_config, save_adapter

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base():
    return base_model()


@pytest.fixture(scope="module")
def config():
    return model_config()


def assert_refused(path: Path, config, *fragments: str, max_rank: int = 64) -> AdapterError:
    with pytest.raises(AdapterError) as info:
        load_peft_adapter(path, config, max_rank=max_rank)
    err = info.value
    assert err.status == 400 and err.param == "lora_path"
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))
    return err


def test_imports_resolve_inside_repository():
    import adapters.peft_format

    assert Path(adapters.peft_format.__file__).resolve().parent == REPO / "adapters"


# ----- what a valid adapter reads as -----

@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_reads_attention_adapter(tmp_path, base, config, safe):
    model = save_adapter(tmp_path, lora_config(r=4, alpha=8, targets=ATTENTION), base, safe=safe)
    assert (tmp_path / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    w = load_peft_adapter(tmp_path, config)
    assert (w.name, w.rank, w.scaling, w.role, w.metadata) == (tmp_path.name, 4, 2.0, "sft", {})
    assert w.target_modules == ("q", "k", "v", "o")
    assert sorted(w.weights) == sorted((layer, m) for layer in range(2) for m in "qkvo")
    a, b = w.weights[(1, "k")]
    assert (a.shape, b.shape, a.dtype, a.device.type) == ((32, 4), (4, 32), torch.float32, "cpu")
    peft_k = model.base_model.model.model.layers[1].self_attn.k_proj
    torch.testing.assert_close(a, peft_k.lora_A["default"].weight.t(), rtol=0, atol=0)
    torch.testing.assert_close(b, peft_k.lora_B["default"].weight.t(), rtol=0, atol=0)


@pytest.mark.parametrize("r", [2, 8])
def test_all_linear_at_two_ranks(tmp_path, base, config, r):
    save_adapter(tmp_path, lora_config(r=r, alpha=16, targets="all-linear"), base)
    w = load_peft_adapter(tmp_path, config, name="mine")
    assert (w.name, w.rank, w.scaling) == ("mine", r, 16 / r)
    assert w.target_modules == ("q", "k", "v", "o", "gate", "up", "down")
    assert len(w.weights) == 2 * 7 and w.module_scaling == {}
    a, b = w.weights[(0, "down")]
    assert (a.shape, b.shape) == ((48, r), (r, 32))


def test_regex_targets(tmp_path, base, config):
    save_adapter(tmp_path, lora_config(targets=r".*\.1\.(self_attn\.v_proj|mlp\.up_proj)"), base)
    w = load_peft_adapter(tmp_path, config)
    assert sorted(w.weights) == [(1, "up"), (1, "v")] and w.target_modules == ("v", "up")


def test_rslora_scaling(tmp_path, base, config):
    save_adapter(tmp_path, lora_config(r=16, alpha=8, use_rslora=True), base)
    assert load_peft_adapter(tmp_path, config).scaling == pytest.approx(8 / math.sqrt(16))


def test_rank_and_alpha_patterns(tmp_path, base, config):
    save_adapter(tmp_path, lora_config(r=8, alpha=16, targets=ATTENTION, rank_pattern={"q_proj": 2},
                                       alpha_pattern={"layers.1.self_attn.v_proj": 4}), base)
    w = load_peft_adapter(tmp_path, config)
    assert w.rank == 8 and w.scaling == 2.0
    assert w.weights[(0, "q")][0].shape == (32, 2)
    assert w.module_scaling == {(0, "q"): 8.0, (1, "q"): 8.0, (1, "v"): 0.5}
    assert w.scaling_of(0, "k") == 2.0 and w.scaling_of(1, "v") == 0.5


def test_reward_model_adapter_keeps_score_head(tmp_path, config):
    base = base_model(seq_cls=True)
    model = save_adapter(tmp_path, lora_config(task_type="SEQ_CLS", modules_to_save=["score"]), base)
    w = load_peft_adapter(tmp_path, config)
    assert w.role == "rm" and list(w.extra) == ["score.weight"]
    torch.testing.assert_close(w.extra["score.weight"],
                               model.base_model.model.score.modules_to_save["default"].weight)


def test_metadata_role_and_fingerprint(tmp_path, base, config):
    meta = {"role": "dpo", "base_fingerprint": {"hidden_size": 32, "num_hidden_layers": 2,
                                                "num_key_value_heads": None}}
    save_adapter(tmp_path, lora_config(), base, metadata=meta)
    w = load_peft_adapter(tmp_path, config)
    assert w.role == "dpo" and w.metadata == meta


# ----- refusals -----

def test_missing_directory(tmp_path, config):
    assert_refused(tmp_path / "nope", config, "nope", "does not exist")


def test_missing_adapter_config(tmp_path, base, config):
    save_adapter(tmp_path, lora_config(), base)
    (tmp_path / "adapter_config.json").unlink()
    assert_refused(tmp_path, config, "missing adapter_config.json")


def test_missing_weights(tmp_path, base, config):
    save_adapter(tmp_path, lora_config(), base)
    (tmp_path / "adapter_model.safetensors").unlink()
    assert_refused(tmp_path, config, "missing adapter_model.safetensors")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_unparseable_config(tmp_path, config, text):
    (tmp_path / "adapter_config.json").write_text(text)
    assert_refused(tmp_path, config, "adapter_config.json")


def test_unreadable_weights(tmp_path, base, config):
    save_adapter(tmp_path, lora_config(), base)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    assert_refused(tmp_path, config, "cannot read adapter weights")


def test_ia3_refused(tmp_path, base, config):
    from peft import IA3Config

    save_adapter(tmp_path, IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"]), base)
    assert_refused(tmp_path, config, "unsupported adapter type IA3; only LoRA")


def test_prefix_tuning_refused(tmp_path, base, config):
    from peft import PrefixTuningConfig

    save_adapter(tmp_path, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), base)
    assert_refused(tmp_path, config, "unsupported adapter type PREFIX_TUNING; only LoRA")


def test_prompt_tuning_refused(tmp_path, config):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING",
                                                              "num_virtual_tokens": 8}))
    assert_refused(tmp_path, config, "unsupported adapter type PROMPT_TUNING; only LoRA")


def test_rank_above_max(tmp_path, base, config):
    save_adapter(tmp_path, lora_config(r=128, alpha=128), base)
    assert_refused(tmp_path, config, "rank 128 exceeds --max-lora-rank 64")
    assert_refused(tmp_path, config, "rank 128 exceeds --max-lora-rank 16", max_rank=16)


def test_shape_mismatch_names_tensor(tmp_path, config):
    save_adapter(tmp_path, lora_config(targets=["gate_proj"]), base_model(intermediate_size=40))
    assert_refused(tmp_path, config, "model.layers.0.mlp.gate_proj.lora_B.weight", "[40, 4]", "expected [48, 4]")


def test_layer_out_of_range(tmp_path, config):
    save_adapter(tmp_path, lora_config(), base_model(num_hidden_layers=3))
    assert_refused(tmp_path, config, "layer 2", "base model has 2 layers")


def test_dora_refused(tmp_path, base, config):
    save_adapter(tmp_path, lora_config(use_dora=True), base)
    assert_refused(tmp_path, config, "DoRA (use_dora) is not supported")


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_embedding_and_head_refused(tmp_path, base, config, target):
    save_adapter(tmp_path, lora_config(targets=["q_proj", target]), base)
    assert_refused(tmp_path, config, f"LoRA on {target} is not supported")


def test_lm_head_lora_tensor_refused_even_if_config_hides_it(tmp_path, base, config):
    save_adapter(tmp_path, lora_config(targets=["q_proj", "lm_head"]), base)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    assert_refused(tmp_path, config, "LoRA on lm_head is not supported")


def test_base_rewriting_init_refused(tmp_path, base, config):
    save_adapter(tmp_path, lora_config(), base)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa"}))
    assert_refused(tmp_path, config, "init_lora_weights 'pissa' changes the base weights")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_refused(tmp_path, base, config, bias):
    save_adapter(tmp_path, lora_config(bias=bias), base)
    assert_refused(tmp_path, config, f"bias {bias!r} is not supported")


def test_full_module_replacement_refused(tmp_path, base, config):
    save_adapter(tmp_path, lora_config(modules_to_save=["lm_head"]), base)
    assert_refused(tmp_path, config, "lm_head.weight replaces base weights")


def test_missing_b_of_a_pair(tmp_path, base, config):
    from safetensors.torch import load_file, save_file

    save_adapter(tmp_path, lora_config(), base)
    weights_path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights_path))
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, str(weights_path))
    assert_refused(tmp_path, config, "layers.1 v has no lora_B tensor")


def test_no_lora_tensors(tmp_path, base, config):
    from safetensors.torch import save_file

    save_adapter(tmp_path, lora_config(), base)
    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    assert_refused(tmp_path, config, "no LoRA tensors")


def test_role_must_match_task_type(tmp_path, base, config):
    save_adapter(tmp_path, lora_config(), base, metadata={"role": "rm"})
    assert_refused(tmp_path, config, "role 'rm' needs task_type SEQ_CLS")


def test_reward_model_without_score_head(tmp_path, config):
    save_adapter(tmp_path, lora_config(task_type="SEQ_CLS", modules_to_save=[]), base_model(seq_cls=True))
    from safetensors.torch import load_file, save_file
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if "score" not in k}, str(path))
    assert_refused(tmp_path, config, "no score.weight")


def test_different_base_fingerprint(tmp_path, base, config):
    save_adapter(tmp_path, lora_config(), base, metadata={"role": "sft", "base_fingerprint": {"vocab_size": 50}})
    assert_refused(tmp_path, config, "different base model", "vocab_size 50 != 96")
