"""Tiny random Llama bases and PEFT adapters written to disk; nothing is downloaded, all seeded."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from adapters.peft_format import MODULES, LoRAWeights, module_shape
from server.models.config import ModelConfig

# head_dim * num_heads (64) != hidden (32) and kv (32) != q, so a swapped in/out dim cannot pass.
TINY: dict[str, Any] = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            max_position_embeddings=64)
HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def hf_config(**overrides: Any):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY, **overrides})


def model_config(**overrides: Any) -> ModelConfig:
    return ModelConfig.from_hf(hf_config(**overrides))


def base_model(seed: int = 0, seq_cls: bool = False, **overrides: Any):
    """A tiny random-weight LlamaForCausalLM (or 1-label sequence classifier), float32, eval."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    if seq_cls:
        return LlamaForSequenceClassification(hf_config(num_labels=1, **overrides)).eval()
    return LlamaForCausalLM(hf_config(**overrides)).eval()


def save_adapter(path: Path, peft_config: Any, base: Any = None, seed: int = 1, safe: bool = True,
                 metadata: dict[str, Any] | None = None) -> Any:
    """Wrap a copy of `base` with `peft_config`, randomise every adapter weight, save to `path`.

    PEFT initialises lora_B to zero, which would make every delta vanish; random A and B make
    the oracle tests meaningful. Returns the PEFT model (eval mode).
    """
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base if base is not None else base_model()), peft_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    model.eval()
    model.save_pretrained(str(path), safe_serialization=safe)
    if metadata is not None:
        (path / "alignserve.json").write_text(json.dumps(metadata))
    return model


def lora_config(r: int = 4, alpha: float = 8, targets: Any = ("q_proj", "v_proj"), **kw: Any):
    from peft import LoraConfig

    kw.setdefault("task_type", "CAUSAL_LM")
    targets = targets if isinstance(targets, str) else list(targets)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, **kw)


def hf_module(model: Any, layer: int, module: str) -> torch.nn.Module:
    """The (possibly LoRA-wrapped) HF projection of a PEFT or plain HF model."""
    root = model.base_model.model if hasattr(model, "peft_config") else model
    return root.get_submodule(f"model.layers.{layer}.{HF_NAMES[module]}")


def fake_weights(config: ModelConfig, name: str, modules: tuple[str, ...] = MODULES, rank: int = 4,
                 seed: int = 0, scaling: float = 2.0) -> LoRAWeights:
    """Random host weights for registry tests (no PEFT round trip needed there)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(config.num_layers):
        for module in modules:
            in_f, out_f = module_shape(config, module)
            weights[(layer, module)] = (torch.randn(in_f, rank, generator=gen),
                                        torch.randn(rank, out_f, generator=gen))
    return LoRAWeights(name=name, path=Path(name), rank=rank, scaling=scaling, role="sft",
                       target_modules=tuple(m for m in MODULES if m in modules), weights=weights)
