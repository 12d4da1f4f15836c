"""Fixtures for method tests: the HF reference model and an engine with method adapters."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def chat_ids(engine, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])


def run_requests(engine, jobs: dict[str, tuple[list[int], object, dict]]) -> dict[str, dict]:
    """Add every job at once (one continuous batch) and collect tokens, logprobs, alignment."""
    for rid, (ids, params, kwargs) in jobs.items():
        engine.add_request(rid, ids, params, **kwargs)
    out: dict[str, dict] = {rid: {"tokens": {}, "logprobs": {}, "alignment": None} for rid in jobs}
    while engine.has_unfinished:
        for d in engine.step():
            o = out[d.request_id]
            o["tokens"].setdefault(d.index, []).extend(d.new_token_ids)
            o["logprobs"].setdefault(d.index, []).extend(d.logprobs or [])
            if d.extra and "alignment" in d.extra:
                o["alignment"] = d.extra["alignment"]
    return out


@pytest.fixture(scope="session")
def method_adapters(model_dir, tmp_path_factory) -> dict[str, Path]:
    """An ARM (causal-LM LoRA that visibly changes greedy output) and a reward model."""
    from tests.adapters.real_lora import ATTENTION, make_real_adapter
    from tests.methods.adapters import make_reward_adapter

    root = tmp_path_factory.mktemp("method_adapters")
    return {"arm": make_real_adapter(model_dir, root / "arm", ATTENTION, rank=8, seed=11, std=0.1),
            "rm": make_reward_adapter(model_dir, root / "rm", seed=5)}


@pytest.fixture(scope="module")
def method_engine(model_dir, method_adapters):
    from adapters.peft_format import load_peft_adapter
    from tests.conftest import make_engine

    engine = make_engine(model_dir, num_kv_blocks=256)
    for name, path in method_adapters.items():
        engine.add_adapter(name, load_peft_adapter(path, engine.model_config, 64, name))
    return engine
