"""PEFT adapters for method tests: a random reward model (LoRA + score head) and a random ARM."""
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


def reward_model(model_dir: Path, adapter_dir: Path):
    """HF transformers + PEFT reward model (independent of our engine)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    return model
