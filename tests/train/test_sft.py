"""`train sft` on a tiny random Llama: the loss drops, the adapter loads into PEFT and changes
greedy output, metadata is complete, runs are reproducible, bad adapters are refused up front."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.train.common import (
    SUPPORTED_TARGETS,
    LoraOptions,
    TrainError,
    TrainOptions,
    TrainResult,
    read_metadata,
)
from adapters.train.data import file_sha256
from adapters.train.dpo import train_dpo
from adapters.train.reward import train_rm
from adapters.train.sft import train_sft


def sft_options(base: Path, data: Path, output: Path, **overrides: object) -> TrainOptions:
    defaults = dict(data=data, output=output, base=str(base), lr=1e-2, max_steps=60, batch_size=8,
                    logging_steps=5, progress=False, lora=LoraOptions(dropout=0.0))
    return TrainOptions(**{**defaults, **overrides})


@pytest.fixture(scope="module")
def sft_run(tiny_base: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    torch.set_num_threads(1)
    return train_sft(sft_options(tiny_base, data_dir / "sft.jsonl", tmp_path_factory.mktemp("sft") / "adapter"))


def test_loss_decreases(sft_run: TrainResult) -> None:
    losses = sft_run.loss_history
    assert sft_run.steps == 60 and len(losses) >= 6
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses


def greedy(model: torch.nn.Module, tokenizer: object, prompt: str) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_adapter_loads_into_peft_and_changes_greedy_output(sft_run: TrainResult, tiny_base: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    before = greedy(base, tokenizer, "tell me about boats please")
    adapted = PeftModel.from_pretrained(base, sft_run.output).eval()
    after = greedy(adapted, tokenizer, "tell me about boats please")
    assert after != before
    assert "banana" in after  # the SFT answers' marker word
    with adapted.disable_adapter():
        assert greedy(adapted, tokenizer, "tell me about boats please") == before


def test_output_is_a_peft_dir_with_metadata(sft_run: TrainResult, tiny_base: Path, data_dir: Path) -> None:
    out = sft_run.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 16 and config["lora_alpha"] == 32
    assert set(config["target_modules"]) == set(SUPPORTED_TARGETS)  # the defaults: every projection
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    meta = read_metadata(out)
    assert meta["role"] == "sft" and meta["base_model"] == str(tiny_base) and meta["steps"] == 60
    assert meta["data"]["sha256"] == file_sha256(data_dir / "sft.jsonl")
    assert meta["base_fingerprint"]["hidden_size"] == 64
    assert meta["metrics"]["last_loss"] == sft_run.loss_history[-1]


def test_seeded_runs_are_identical(tiny_base: Path, data_dir: Path, tmp_path: Path) -> None:
    runs = [train_sft(sft_options(tiny_base, data_dir / "sft.jsonl", tmp_path / f"run{i}", max_steps=4,
                                  lora=LoraOptions(dropout=0.1)))
            for i in range(2)]
    a, b = (load_file(r.output / "adapter_model.safetensors") for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].loss_history == runs[1].loss_history


def test_base_adapter_mismatch_is_refused_before_training(sft_run: TrainResult, other_base: Path,
                                                          data_dir: Path, tmp_path: Path) -> None:
    opts = sft_options(other_base, data_dir / "pref_train.jsonl", tmp_path / "dpo", init_adapter=sft_run.output)
    with pytest.raises(TrainError, match="different base.*hidden_size 64 != 32"):
        train_dpo(opts)
    with pytest.raises(TrainError, match="task_type 'CAUSAL_LM' cannot start a 'rm' run"):
        train_rm(sft_options(other_base, data_dir / "pref_train.jsonl", tmp_path / "rm",
                             init_adapter=sft_run.output))
    assert not (tmp_path / "dpo").exists() and not (tmp_path / "rm").exists()


def test_existing_output_and_bad_targets_are_refused(sft_run: TrainResult, tiny_base: Path, data_dir: Path) -> None:
    with pytest.raises(TrainError, match="already holds an adapter"):
        train_sft(sft_options(tiny_base, data_dir / "sft.jsonl", sft_run.output))
    with pytest.raises(TrainError, match="not supported"):
        train_sft(sft_options(tiny_base, data_dir / "sft.jsonl", sft_run.output, overwrite=True,
                              lora=LoraOptions(target_modules=("embed_tokens",))))


def test_dpo_continues_from_the_sft_adapter(sft_run: TrainResult, tiny_base: Path, data_dir: Path,
                                            tmp_path: Path) -> None:
    result = train_dpo(sft_options(tiny_base, data_dir / "pref_eval.jsonl", tmp_path / "dpo", max_steps=2,
                                   init_adapter=sft_run.output))
    meta = read_metadata(result.output)
    assert meta["role"] == "dpo" and meta["init_adapter"] == str(sft_run.output) and result.steps == 2
    start = load_file(sft_run.output / "adapter_model.safetensors")
    end = load_file(result.output / "adapter_model.safetensors")
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)
