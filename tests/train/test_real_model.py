"""Two-step runs of all four trainers on the real default model (SmolLM2-135M, its tokenizer and
chat template), ~20 s in all on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters.train.arm import train_arm
from adapters.train.common import TrainOptions, read_metadata
from adapters.train.data import write_jsonl
from adapters.train.dpo import train_dpo
from adapters.train.reward import train_rm
from adapters.train.sft import train_sft
from tests.train.tiny import preference_rows, sft_rows



@pytest.mark.parametrize("role", ["sft", "dpo", "rm", "arm"])
def test_two_steps_on_the_default_model(role: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = tmp_path / "data.jsonl"
    write_jsonl(data, sft_rows(8) if role == "sft" else preference_rows(8))
    train = {"sft": train_sft, "dpo": train_dpo, "rm": train_rm, "arm": train_arm}[role]
    result = train(TrainOptions(data=data, output=tmp_path / role, base=None, max_steps=2, batch_size=2,
                                max_length=256, logging_steps=1, progress=False))
    meta = read_metadata(result.output)
    assert meta["role"] == role and meta["base_model"] == "SmolLM2-135M-Instruct" and result.steps == 2
    assert meta["base_fingerprint"]["hidden_size"] == 576
    config = json.loads((result.output / "adapter_config.json").read_text())
    assert config["task_type"] == ("SEQ_CLS" if role == "rm" else "CAUSAL_LM")
    assert all(loss == loss for loss in result.loss_history)  # no NaN
