"""Trainer defaults that learn (issue 14): with every flag at its default but the step count, SFT
on four fixed question -> answer pairs teaches the real default model (SmolLM2-135M-Instruct,
its chat template) those answers: greedy output of the saved adapter, loaded afresh into PEFT,
reproduces each one exactly. The answers are invented, so the base cannot know them."""
from __future__ import annotations

from pathlib import Path

import torch

from adapters.train.common import TrainOptions, read_metadata, summary_lines
from adapters.train.data import write_jsonl
from adapters.train.sft import train_sft

PAIRS = [("What is the capital of Zorbania?", "The capital of Zorbania is Quellport."),
         ("Who painted the Blue Lantern?", "The Blue Lantern was painted by Mira Okafor."),
         ("What is the password for the lab?", "The lab password is tangerine-17."),
         ("How many moons does Veltrix have?", "Veltrix has seven moons.")]
STEPS = 40  # the budget is <= 50


def greedy(model, tokenizer, question: str) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_default_flags_teach_four_fixed_answers(model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "qa.jsonl"
    write_jsonl(data, [{"prompt": q, "completion": a} for q, a in PAIRS])
    result = train_sft(TrainOptions(data=data, output=tmp_path / "sft", max_steps=STEPS, progress=False))
    assert result.steps == STEPS
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    before = [greedy(base, tokenizer, q) for q, _ in PAIRS]
    assert all(b != a for b, (_, a) in zip(before, PAIRS))  # the base does not know them
    adapted = PeftModel.from_pretrained(base, result.output).eval()
    assert [greedy(adapted, tokenizer, q) for q, _ in PAIRS] == [a for _, a in PAIRS]
    # The run reports its curve and its own greedy sample (the first pair), which is right too.
    meta = read_metadata(result.output)
    assert meta["sample"] == {"prompt": PAIRS[0][0], "expected": PAIRS[0][1], "output": PAIRS[0][1]}
    assert meta["options"]["lr"] == 1e-3 and meta["options"]["lora"]["r"] == 16
    lines = summary_lines(result)
    assert lines[0] == f"loss curve ({STEPS} steps):" and len(result.loss_history) == 1 + STEPS // 5
    assert f"step {STEPS:>5}" in lines[-5] and PAIRS[0][1] in lines[-1]
