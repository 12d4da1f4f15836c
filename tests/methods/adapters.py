"""PEFT adapters for method tests (a random reward model: LoRA + score head) and their float64
HF references."""
from __future__ import annotations

from pathlib import Path

import torch


def make_reward_adapter(model_dir: Path, out: Path, seed: int, rank: int = 8, std: float = 0.05) -> Path:
    """A SEQ_CLS LoRA with a random `score` head (modules_to_save), as TRL's RewardTrainer saves."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="SEQ_CLS",
                        target_modules=["q_proj", "v_proj", "up_proj"], modules_to_save=["score"])
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    model.save_pretrained(str(out))
    return out


def float64_merged(model_dir: Path, adapter_dir: Path, auto_class, **kwargs):
    """HF transformers + PEFT in float64, the LoRA merged in float64 too (a float32 merge would
    round W + BA to float32: the reference's own error would then be the engine's size)."""
    from peft import PeftModel

    base = auto_class.from_pretrained(str(model_dir), dtype=torch.float64, **kwargs)
    return PeftModel.from_pretrained(base, str(adapter_dir)).double().merge_and_unload().eval()


def reward_model(model_dir: Path, adapter_dir: Path):
    """HF transformers + PEFT reward model in float64 (independent of our engine)."""
    from transformers import AutoModelForSequenceClassification

    return float64_merged(model_dir, adapter_dir, AutoModelForSequenceClassification, num_labels=1)


def reward_and_error(model, ids: list[int]) -> tuple[float, float]:
    """The float64 reward of `ids` and how far the fp32 engine's may be off (numerics.py)."""
    from tests.methods.numerics import HeadErrors

    config = model.config
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    head = HeadErrors(model.score.weight, config.hidden_size, config.intermediate_size)
    # The score head reads the last position after the final norm (one more reduction).
    return float(out.logits[0, 0]), head(out.hidden_states[-1][0, -1], config.num_hidden_layers + 1)
