"""`train arm`: GenARM's autoregressive reward model (arXiv 2410.08193) as a causal-LM LoRA.

In: preference JSONL (`data.load_preferences`). Out: a causal-LM PEFT adapter, role "arm".
The reward is the ARM's summed log-prob of the response tokens (prompt masked):
    r(x, y) = sum_t log pi_r(y_t | x, y_<t)
trained with no reference model on
    L = -log sigmoid(beta_r * (r(x, y_w) - r(x, y_l)) - gamma).
TRL dropped `DPOConfig(reference_free=True)`; with gamma = 0 this equals
`trl.experimental.cpo.CPOTrainer(loss_type="sigmoid", cpo_alpha=0.0)` (tests check that), but the
loss is written here so the API churn of an experimental trainer cannot change it.
Batches use CPO's key names (`chosen_input_ids`, `chosen_attention_mask`, `chosen_labels`, and
the same for `rejected_`) so one batch can be fed to both.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

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

IGNORE = -100


def response_features(tokenizer: Any, prompt: list[Message], response: list[Message],
                      max_length: int) -> dict[str, list[int]]:
    """input_ids / attention_mask / labels for prompt + response, labels = -100 on the prompt."""
    prompt_ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
    full_ids = list(tokenizer.apply_chat_template(prompt + response, tokenize=True,
                                                  return_dict=True)["input_ids"])
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise TrainError("the chat template renders the prompt differently once a response follows; "
                         "response tokens cannot be separated from the prompt")
    if len(prompt_ids) >= max_length:
        raise TrainError(f"a prompt has {len(prompt_ids)} tokens, not less than --max-length {max_length}")
    full_ids = full_ids[:max_length]
    labels = [IGNORE] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return {"input_ids": full_ids, "attention_mask": [1] * len(full_ids), "labels": labels}


def tokenize_pairs(tokenizer: Any, examples: Sequence[dict[str, list[Message]]],
                   max_length: int) -> list[dict[str, list[int]]]:
    """Tokenise preference examples into CPO-style chosen_/rejected_ features."""
    rows = []
    for ex in examples:
        row: dict[str, list[int]] = {}
        for side in ("chosen", "rejected"):
            for key, value in response_features(tokenizer, ex["prompt"], ex[side], max_length).items():
                row[f"{side}_{key}"] = value
        rows.append(row)
    return rows


def collate_pairs(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad every chosen_/rejected_ sequence of the batch to one common width."""
    width = max(len(f[f"{side}_input_ids"]) for f in features for side in ("chosen", "rejected"))
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE}
    batch: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        for key, pad in pads.items():
            rows = [f[f"{side}_{key}"] + [pad] * (width - len(f[f"{side}_{key}"])) for f in features]
            batch[f"{side}_{key}"] = torch.tensor(rows, dtype=torch.long)
    return batch


def _pad_to(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[1]), value=value)


def sequence_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of the labelled (non -100) tokens, per row: [batch]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, :-1, :].float()  # [batch, seq-1, vocab]: position t predicts token t+1
    targets = labels[:, 1:]
    mask = targets != IGNORE
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)


def pair_logprobs(model: Any, batch: dict[str, torch.Tensor],
                  pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """r(x, y_w), r(x, y_l) for a batch, in one forward pass over [chosen; rejected]."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    cat = {key: torch.cat([_pad_to(batch[f"chosen_{key}"], width, pad),
                           _pad_to(batch[f"rejected_{key}"], width, pad)])
           for key, pad in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", IGNORE))}
    logps = sequence_logprobs(model, cat["input_ids"], cat["attention_mask"], cat["labels"])
    n = batch["chosen_input_ids"].shape[0]
    return logps[:n], logps[n:]


def arm_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta_r: float, gamma: float) -> torch.Tensor:
    """GenARM loss: mean of -log sigmoid(beta_r * (r_w - r_l) - gamma)."""
    return -F.logsigmoid(beta_r * (chosen - rejected) - gamma).mean()


class ArmTrainer(Trainer):
    """A `Trainer` whose loss is `arm_loss` on summed response log-probs (no reference model)."""

    # The loss is a per-pair mean, so Trainer must divide it by the gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, beta_r: float, gamma: float = 0.0, pad_token_id: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.beta_r, self.gamma, self.pad_token_id = beta_r, gamma, pad_token_id
        self._pending: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        chosen, rejected = pair_logprobs(model, inputs, self.pad_token_id)
        loss = arm_loss(chosen, rejected, self.beta_r, self.gamma)
        margin = (chosen - rejected).detach()
        self._pending["rewards/accuracies"].append((margin > 0).float().mean().item())
        self._pending["rewards/margins"].append(self.beta_r * margin.mean().item())
        return (loss, {"chosen_logps": chosen, "rejected_logps": rejected}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for key, values in self._pending.items():
            if values:
                logs[key] = sum(values) / len(values)
        self._pending.clear()
        super().log(logs, start_time)


def pairwise_accuracy(model: Any, tokenizer: Any, examples: Sequence[dict[str, list[Message]]],
                      max_length: int = 1024, batch_size: int = 16) -> float:
    """Fraction of pairs the ARM ranks correctly by summed response log-probs."""
    rows = tokenize_pairs(tokenizer, examples, max_length)
    device = next(model.parameters()).device
    correct = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate_pairs(rows[start:start + batch_size],
                                                                tokenizer.pad_token_id).items()}
            chosen, rejected = pair_logprobs(model, batch, tokenizer.pad_token_id)
            correct += int((chosen > rejected).sum().item())
    return correct / len(rows)


def train_arm(opts: TrainOptions, beta_r: float = 0.05, gamma: float = 0.0) -> TrainResult:
    """Train a GenARM autoregressive reward LoRA; checks run before the model is loaded."""
    if beta_r <= 0:
        raise TrainError(f"--beta-r must be positive, got {beta_r}")
    examples, eval_examples, base, tokenizer = prepare_run(opts, "arm", load_preferences)
    rows = tokenize_pairs(tokenizer, examples, opts.max_length)

    from datasets import Dataset
    from peft import get_peft_model
    from transformers import TrainingArguments

    model = load_model(base, "arm", tokenizer, opts.seed)
    model, peft_config = attach_adapter(model, opts, "arm", base)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    args = TrainingArguments(**training_kwargs(opts, "arm"), remove_unused_columns=False, label_names=[])
    trainer = ArmTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         data_collator=lambda f: collate_pairs(f, tokenizer.pad_token_id),
                         beta_r=beta_r, gamma=gamma, pad_token_id=tokenizer.pad_token_id)
    output = trainer.train()
    losses = loss_history(trainer.state.log_history)
    metrics = {"train_loss": float(output.training_loss)}
    if losses:
        metrics.update(first_loss=losses[0], last_loss=losses[-1])
    for entry in trainer.state.log_history:
        metrics.update({k: float(v) for k, v in entry.items() if k.startswith("rewards/")})
    if eval_examples:
        metrics["eval_pairwise_accuracy"] = pairwise_accuracy(trainer.model, tokenizer, eval_examples,
                                                              opts.max_length, opts.batch_size)
    arm = {"beta_r": beta_r, "gamma": gamma,
           "reward": "sum of log-probs of the response tokens (chat template; prompt incl. generation "
                     "prompt masked; end-of-turn tokens scored)",
           "decoding": "log p_base + (1/beta) * log p_arm"}
    return save_adapter(trainer.model, opts, "arm", base, trainer.state.global_step, metrics, losses,
                        len(examples), extra={"arm": arm})
