"""GenARM ARM: the loss matches TRL's reference-free sigmoid loss (CPO, cpo_alpha=0) on the same
batch, gamma enters as stated, and training ranks held-out marker pairs >= 0.9 by summed log-probs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from adapters.train.arm import (ArmTrainer, arm_loss, collate_pairs, pair_logprobs, pairwise_accuracy,
                                tokenize_pairs, train_arm)
from adapters.train.common import LoraOptions, TrainOptions, read_metadata
from adapters.train.data import load_preferences


def test_arm_loss_formula() -> None:
    chosen, rejected = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    beta, gamma = 0.5, 0.3
    expected = sum(-math.log(1 / (1 + math.exp(-(beta * (c - r) - gamma))))
                   for c, r in ((-10.0, -12.0), (-4.0, -3.0))) / 2
    assert arm_loss(chosen, rejected, beta, gamma).item() == pytest.approx(expected, rel=1e-6)


def test_equals_trl_cpo_sigmoid_without_bc_term(tiny_base: Path, data_dir: Path, tmp_path: Path) -> None:
    """NOTE: CPOTrainer now lives in trl.experimental.cpo (TRL 1.x)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    pairs = load_preferences(data_dir / "pref_eval.jsonl")[:8]
    # CPO takes string prompts: render the chat template the way the ARM sees it.
    rows = [{"prompt": tokenizer.apply_chat_template(p["prompt"], add_generation_prompt=True, tokenize=False),
             "chosen": p["chosen"][0]["content"], "rejected": p["rejected"][0]["content"]} for p in pairs]
    beta = 0.3
    common = dict(per_device_train_batch_size=8, report_to="none", use_cpu=True, save_strategy="no")
    cpo = CPOTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                     args=CPOConfig(output_dir=str(tmp_path / "cpo"), loss_type="sigmoid", cpo_alpha=0.0,
                                    alpha=0.0, beta=beta, bf16=False, gradient_checkpointing=False,
                                    max_length=256, **common))
    batch = next(iter(cpo.get_train_dataloader()))
    ours = ArmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "arm"), **common),
                      beta_r=beta, gamma=0.0, pad_token_id=tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        expected = cpo.compute_loss(model, batch)
        got = ours.compute_loss(model, batch)
    assert abs(expected.item() - math.log(2)) > 1e-3  # a non-trivial batch
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    with torch.no_grad():  # gamma shifts the logit exactly as the formula says
        chosen, rejected = pair_logprobs(model, batch, tokenizer.pad_token_id)
        ours.gamma = 0.7
        assert ours.compute_loss(model, batch).item() == pytest.approx(
            arm_loss(chosen, rejected, beta, 0.7).item(), rel=1e-6)
    # Our own tokenisation masks exactly the chat-formatted prompt, like CPO's labels do.
    own = collate_pairs(tokenize_pairs(tokenizer, pairs, 256), tokenizer.pad_token_id)
    assert int((own["chosen_labels"] != -100).sum()) > 0
    assert (own["chosen_labels"][:, 0] == -100).all()


def test_arm_ranks_heldout_pairs(tiny_base: Path, data_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    opts = TrainOptions(data=data_dir / "pref_train.jsonl", eval_data=data_dir / "pref_eval.jsonl",
                        output=tmp_path / "arm", base=str(tiny_base), lr=1e-2, epochs=2, batch_size=8,
                        logging_steps=8, progress=False, lora=LoraOptions(dropout=0.0))
    result = train_arm(opts, beta_r=0.5, gamma=0.0)
    assert result.metrics["eval_pairwise_accuracy"] >= 0.9, result.metrics
    assert sum(result.loss_history[-2:]) / 2 < result.loss_history[0], result.loss_history
    meta = read_metadata(result.output)
    assert meta["role"] == "arm" and meta["arm"] == meta["arm"] | {"beta_r": 0.5, "gamma": 0.0}

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, result.output).eval()
    eval_pairs = load_preferences(data_dir / "pref_eval.jsonl")
    assert pairwise_accuracy(model, tokenizer, eval_pairs) == result.metrics["eval_pairwise_accuracy"]
    with model.disable_adapter():
        assert pairwise_accuracy(model, tokenizer, eval_pairs) < 0.9  # the untrained base does not rank them
