"""`train sft`: supervised fine-tuning of a LoRA on chat data, loss on assistant tokens only.

In: JSONL of chat messages (see `data.load_sft`). Out: a causal-LM PEFT adapter, role "sft".
TRL's `SFTTrainer` does the work. Each assistant turn becomes one conversational
prompt/completion example, so TRL's completion-only loss masks everything but that turn (and its
end-of-turn token), with no need for `{% generation %}` markers in the base's chat template.
"""
from __future__ import annotations

from adapters.train.common import (
    TrainOptions,
    TrainResult,
    attach_adapter,
    load_model,
    loss_history,
    prepare_run,
    save_adapter,
    training_kwargs,
)
from adapters.train.data import load_sft


def train_sft(opts: TrainOptions) -> TrainResult:
    """Train an SFT LoRA; all input checks run before the model is loaded."""
    examples, eval_examples, base, tokenizer = prepare_run(opts, "sft", load_sft)

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, peft_config = attach_adapter(load_model(base, "sft", tokenizer, opts.seed), opts, "sft", base)
    args = SFTConfig(**training_kwargs(opts), max_length=opts.max_length, completion_only_loss=True,
                     packing=False, dataset_num_proc=None)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(examples),
        eval_dataset=Dataset.from_list(eval_examples) if eval_examples else None,
        processing_class=tokenizer, peft_config=peft_config)
    output = trainer.train()
    metrics = {"train_loss": float(output.training_loss)}
    losses = loss_history(trainer.state.log_history)
    if losses:
        metrics.update(first_loss=losses[0], last_loss=losses[-1])
    if eval_examples:
        metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    return save_adapter(trainer.model, opts, "sft", base, trainer.state.global_step, metrics, losses,
                        len(examples))
