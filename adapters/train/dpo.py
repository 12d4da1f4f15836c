"""`train dpo`: Direct Preference Optimisation of a LoRA with TRL's `DPOTrainer`.

In: preference JSONL (`data.load_preferences`). Out: a causal-LM PEFT adapter, role "dpo".
NOTE: no separate reference model is loaded: under PEFT, TRL computes the reference log-probs
with the adapter disabled, i.e. the reference is the plain base (also with `--init-adapter`, so
DPO from an SFT adapter regularises towards the base, not towards the SFT model).
"""
from __future__ import annotations

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
from adapters.train.data import load_preferences

_LOGGED = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def last_logged(log_history: list[dict[str, Any]], keys: tuple[str, ...], prefix: str = "") -> dict[str, float]:
    """The most recent logged value of each key (absent keys are skipped)."""
    found: dict[str, float] = {}
    for entry in log_history:
        for key in keys:
            if prefix + key in entry:
                found[prefix + key] = float(entry[prefix + key])
    return found


def train_dpo(opts: TrainOptions, beta: float = 0.1) -> TrainResult:
    """Train a DPO LoRA (sigmoid loss, temperature `beta`); checks run before loading the model."""
    if beta <= 0:
        raise TrainError(f"--beta must be positive, got {beta}")
    examples, eval_examples, base, tokenizer = prepare_run(opts, "dpo", load_preferences)

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, peft_config = attach_adapter(load_model(base, "dpo", tokenizer, opts.seed), opts, "dpo", base)
    args = DPOConfig(**training_kwargs(opts, "dpo"), beta=beta, loss_type=["sigmoid"], max_length=opts.max_length)
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(examples),
        eval_dataset=Dataset.from_list(eval_examples) if eval_examples else None,
        processing_class=tokenizer, peft_config=peft_config)
    output = trainer.train()
    losses = loss_history(trainer.state.log_history)
    metrics = {"train_loss": float(output.training_loss), **last_logged(trainer.state.log_history, _LOGGED)}
    if losses:
        metrics.update(first_loss=losses[0], last_loss=losses[-1])
    if eval_examples:
        evaluated = trainer.evaluate()
        metrics.update({k: float(v) for k, v in evaluated.items() if k.startswith("eval_")
                        and isinstance(v, (int, float))})
    return save_adapter(trainer.model, opts, "dpo", base, trainer.state.global_step, metrics, losses,
                        len(examples), extra={"dpo": {"beta": beta, "loss_type": "sigmoid",
                                                      "reference": "base (adapter disabled)"}})
