"""`train rm`: a Bradley-Terry reward model as LoRA + scalar `score` head, with TRL's `RewardTrainer`.

In: preference JSONL (`data.load_preferences`). Out: a SEQ_CLS PEFT adapter, role "rm", whose
safetensors carry the trained `score.weight` (LoRA `modules_to_save=["score"]`), plus the scoring
contract in `alignserve.json["rm"]`: the conversation [prompt..., assistant response] is rendered
with the base chat template (no generation prompt) and the reward is the score head applied to the
final hidden state at the last token whose id != pad_token_id (transformers' rule).
`reward_scores` / `pairwise_accuracy` implement that contract for evaluation here.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapters.train.common import (
    TrainError,
    TrainOptions,
    TrainResult,
    attach_adapter,
    load_model,
    loss_history,
    prepare_run,
    save_adapter,
    training_kwargs,
)
from adapters.train.data import Message, load_preferences


def conversation_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of a full conversation under the chat template (as RewardTrainer tokenises)."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def reward_scores(model: Any, tokenizer: Any, conversations: Sequence[list[Message]],
                  batch_size: int = 16) -> list[float]:
    """Score conversations with a sequence-classification reward model (eval mode, no grad)."""
    import torch

    pad = tokenizer.pad_token_id
    scores: list[float] = []
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(conversations), batch_size):
            ids = [conversation_ids(tokenizer, c) for c in conversations[start:start + batch_size]]
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits  # [batch, 1]
            scores.extend(logits[:, 0].float().tolist())
    return scores


def pairwise_accuracy(model: Any, tokenizer: Any, examples: Sequence[dict[str, list[Message]]]) -> float:
    """Fraction of pairs where r(prompt, chosen) > r(prompt, rejected)."""
    chosen = reward_scores(model, tokenizer, [e["prompt"] + e["chosen"] for e in examples])
    rejected = reward_scores(model, tokenizer, [e["prompt"] + e["rejected"] for e in examples])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(examples)


def score_head_entries(adapter: str | Path) -> dict[str, list[int]]:
    """Names and shapes of the saved score-head tensors (must be non-empty for an RM adapter)."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys() if _is_score_key(k)}


def _is_score_key(key: str) -> bool:
    return ".score." in key or key.startswith("score.")


def train_rm(opts: TrainOptions, center_rewards: float | None = 0.01) -> TrainResult:
    """Train a reward-model LoRA; checks run before the model is loaded."""
    examples, eval_examples, base, tokenizer = prepare_run(opts, "rm", load_preferences)

    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model, peft_config = attach_adapter(load_model(base, "rm", tokenizer, opts.seed), opts, "rm", base)
    args = RewardConfig(**training_kwargs(opts, "rm"), max_length=opts.max_length,
                        center_rewards_coefficient=center_rewards)
    dataset = Dataset.from_list(examples)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config)
    if len(trainer.train_dataset) < len(examples):
        raise TrainError(f"{len(examples) - len(trainer.train_dataset)} pair(s) exceed --max-length "
                         f"{opts.max_length}; RewardTrainer would silently drop them")
    output = trainer.train()
    losses = loss_history(trainer.state.log_history)
    metrics = {"train_loss": float(output.training_loss)}
    if losses:
        metrics.update(first_loss=losses[0], last_loss=losses[-1])
    for entry in trainer.state.log_history:
        if "accuracy" in entry:
            metrics["train_accuracy"] = float(entry["accuracy"])
    if eval_examples:
        metrics["eval_pairwise_accuracy"] = pairwise_accuracy(trainer.model, tokenizer, eval_examples)
    from peft import get_peft_model_state_dict

    saved = get_peft_model_state_dict(trainer.model)
    rm_contract = {
        "input": "chat template over [prompt messages..., assistant response], no generation prompt",
        "score_token": "last token whose id != pad_token_id",
        "pad_token_id": tokenizer.pad_token_id,
        "num_labels": 1,
        "center_rewards_coefficient": center_rewards,
        "score_head": {k: list(v.shape) for k, v in saved.items() if _is_score_key(k)},
    }
    if not rm_contract["score_head"]:
        raise RuntimeError("the RM adapter state has no score-head weights; check modules_to_save")
    result = save_adapter(trainer.model, opts, "rm", base, trainer.state.global_step, metrics, losses,
                          len(examples), extra={"rm": rm_contract})
    if set(score_head_entries(opts.output)) != set(rm_contract["score_head"]):
        raise RuntimeError(f"{opts.output}: the saved RM adapter lost its score-head weights")
    return result
