"""`train dpo` on a tiny random Llama: the loss drops and the implicit reward learns the marker."""
from __future__ import annotations

import json
from pathlib import Path

from adapters.train.common import LoraOptions, TrainOptions, read_metadata
from adapters.train.dpo import train_dpo


def test_dpo_loss_decreases(tiny_base: Path, data_dir: Path, tmp_path: Path) -> None:
    opts = TrainOptions(data=data_dir / "pref_train.jsonl", eval_data=data_dir / "pref_eval.jsonl",
                        output=tmp_path / "dpo", base=str(tiny_base), lr=5e-3, epochs=1, batch_size=8,
                        logging_steps=4, progress=False, lora=LoraOptions(dropout=0.0))
    result = train_dpo(opts, beta=0.5)
    losses = result.loss_history
    assert result.steps == 32 and abs(losses[0] - 0.6931) < 1e-3  # adapter starts as the reference
    assert sum(losses[-3:]) / 3 < losses[0] - 0.15, losses
    assert result.metrics["eval_rewards/accuracies"] >= 0.9
    meta = read_metadata(result.output)
    assert meta["role"] == "dpo" and meta["dpo"]["beta"] == 0.5
    assert meta["eval_data"]["path"].endswith("pref_eval.jsonl")
    assert json.loads((result.output / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
