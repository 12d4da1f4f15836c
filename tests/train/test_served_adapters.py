"""Trainer outputs load into our engine: an SFT adapter changes greedy output; RM/ARM keep their roles."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.peft_format import load_peft_adapter
from adapters.train.arm import train_arm
from adapters.train.common import TrainOptions
from adapters.train.data import write_jsonl
from adapters.train.reward import train_rm
from adapters.train.sft import train_sft
from server.engine.engine import RequestError
from server.engine.sequence import SamplingParams
from tests.conftest import make_engine
from tests.train.tiny import MARKER, preference_rows, sft_rows


def greedy(engine, rid: str, ids: list[int], adapter_id: int) -> str:
    engine.add_request(rid, ids, SamplingParams(temperature=0.0, max_tokens=12), adapter_id)
    text = ""
    while engine.has_unfinished:
        text += "".join(d.text for d in engine.step())
    return text


def test_sft_adapter_changes_served_output_and_roles_survive(model_dir, tmp_path: Path):
    torch.manual_seed(0)
    sft_data, pref_data = tmp_path / "sft.jsonl", tmp_path / "pref.jsonl"
    write_jsonl(sft_data, sft_rows(16))
    write_jsonl(pref_data, preference_rows(8))
    common = dict(base=None, batch_size=4, max_length=128, logging_steps=1, progress=False)
    sft = train_sft(TrainOptions(data=sft_data, output=tmp_path / "sft", max_steps=12, lr=5e-3, **common))
    rm = train_rm(TrainOptions(data=pref_data, output=tmp_path / "rm", max_steps=1, **common))
    arm = train_arm(TrainOptions(data=pref_data, output=tmp_path / "arm", max_steps=1, **common))

    engine = make_engine(model_dir)
    for name, result in (("sft", sft), ("rm", rm), ("arm", arm)):
        weights = load_peft_adapter(result.output, engine.model_config, 64, name)
        assert weights.role == name
        engine.add_adapter(name, weights)
    assert "score.weight" in engine.adapters.get("rm").weights.extra
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "tell me about cats please"}])
    base = greedy(engine, "base", ids, 0)
    tuned = greedy(engine, "sft", ids, engine.resolve_adapter("sft"))
    assert tuned != base
    assert MARKER in tuned
    with pytest.raises(RequestError):
        engine.resolve_adapter("rm")  # a reward model scores; it does not generate
    assert engine.resolve_adapter("arm") > 0
