"""Fixtures for method tests: the float64 HF reference model and an engine with method adapters."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """The reference in float64: its rounding is negligible next to the fp32 engine's, so the
    tolerances of tests/methods/numerics.py bound the engine alone."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()


@pytest.fixture(scope="session")
def lm_head_errors(hf_model):
    from tests.methods.numerics import HeadErrors

    config = hf_model.config
    return HeadErrors(hf_model.lm_head.weight, config.hidden_size, config.intermediate_size)


def teacher_forced(model, prompt: list[int], tokens: list[int]) -> Iterator:
    """HF outputs (with hidden states) whose last position predicts tokens[i], for each i:
    the prompt in one forward pass, then one cached pass per token fed back."""
    def forward(ids: list[int], **cache):
        # NOTE: no_grad per call, not around the yields: it would leak into the caller.
        with torch.no_grad():
            return model(torch.tensor([ids]), use_cache=True, output_hidden_states=True, **cache)

    out = forward(prompt)
    for i, token in enumerate(tokens):
        yield out
        if i + 1 < len(tokens):
            key = "cache" if "cache" in out else "past_key_values"  # renamed in transformers 5.x
            out = forward([token], **{key: out[key]})


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
