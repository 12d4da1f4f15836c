"""`train rm`: LoRA + score head reaches >= 0.9 held-out pairwise accuracy on the marker task, and
the saved adapter alone (with its score head) reproduces the scores."""
from __future__ import annotations

from pathlib import Path

import torch

from adapters.train.common import LoraOptions, TrainOptions, read_metadata
from adapters.train.data import load_preferences
from adapters.train.reward import pairwise_accuracy, reward_scores, score_head_entries, train_rm


def test_rm_learns_marker_and_reloads(tiny_base: Path, data_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    opts = TrainOptions(data=data_dir / "pref_train.jsonl", eval_data=data_dir / "pref_eval.jsonl",
                        output=tmp_path / "rm", base=str(tiny_base), lr=5e-3, epochs=1, batch_size=8,
                        logging_steps=4, progress=False, lora=LoraOptions(dropout=0.0))
    result = train_rm(opts)
    assert result.metrics["eval_pairwise_accuracy"] >= 0.9, result.metrics
    assert result.loss_history[-1] < result.loss_history[0]

    heads = score_head_entries(result.output)
    assert heads and all(shape == [1, 64] for shape in heads.values())
    meta = read_metadata(result.output)
    assert meta["role"] == "rm" and meta["rm"]["score_head"] == heads
    assert meta["rm"]["pad_token_id"] is not None

    # A fresh base + the adapter directory must reproduce the trained scores (score head included).
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1, dtype=torch.float32)
    base.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, result.output).eval()
    eval_pairs = load_preferences(data_dir / "pref_eval.jsonl")
    assert pairwise_accuracy(model, tokenizer, eval_pairs) == result.metrics["eval_pairwise_accuracy"]
    scores = reward_scores(model, tokenizer, [eval_pairs[0]["prompt"] + eval_pairs[0]["chosen"]])
    with model.disable_adapter():  # the untrained random head gives different scores
        assert reward_scores(model, tokenizer, [eval_pairs[0]["prompt"] + eval_pairs[0]["chosen"]]) != scores
