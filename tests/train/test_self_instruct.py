"""Magpie synthesis: the pre-query prefix, filtering, dedupe, and the request flow."""
from __future__ import annotations

import asyncio
import itertools

import pytest

from adapters.train.preferences import SamplingConfig
from adapters.train.self_instruct import MagpieConfig, dedupe, pre_query_template, synthesize
from tests.train.fake_openai import FakeOpenAI
from tests.train.tiny import build_tokenizer


def test_pre_query_prefix_of_chatml() -> None:
    prefix, stop = pre_query_template(build_tokenizer())
    assert prefix == "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n"
    assert stop == "<|im_end|>"
    prefix, _ = pre_query_template(build_tokenizer(), system_prompt="Be brief.")
    assert prefix == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"


def test_pre_query_prefix_of_the_default_model() -> None:
    default_model = pytest.importorskip("server.models.default_model")
    if not (default_model.default_model_dir() / "config.json").is_file():
        pytest.skip("default model not converted yet (make model)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model.default_model_dir())
    prefix, stop = pre_query_template(tokenizer)
    assert prefix.startswith("<|im_start|>system\n") and prefix.endswith("<|im_end|>\n<|im_start|>user\n")
    assert stop == "<|im_end|>"


def test_dedupe_exact_and_near() -> None:
    texts = ["Write a poem about the sea.", "write a poem about the sea", "Write a poem about the sea now please",
             "Explain how tides work.", "Write a poem about the sea and its many waves and the wind"]
    assert dedupe(texts, threshold=0.5) == ["Write a poem about the sea.", "Explain how tides work.",
                                            "Write a poem about the sea and its many waves and the wind"]


def test_synthesize_flow() -> None:
    generated = itertools.cycle([
        "Write a haiku about autumn leaves.", "  Write a haiku about autumn leaves  ",  # dupe
        "hi",  # too short
        "Explain photosynthesis to a child.", "Tell me <|im_start|> a leak",  # marker leak
        "List three uses of copper wire.", "How do I bake sourdough bread at home?",
    ])
    answers = {"How do I bake sourdough bread at home?": ("A very long answer", "length")}

    fake = FakeOpenAI(complete=lambda body: next(generated),
                      chat=lambda body: [answers.get(body["messages"][0]["content"], ("An answer.", "stop"))])
    rows, stats = asyncio.run(synthesize(build_tokenizer(), SamplingConfig(server="http://fake/v1", concurrency=1),
                                         MagpieConfig(n=4, max_rounds=3), http_client=fake.client()))
    instructions = [r["messages"][0]["content"] for r in rows]
    assert instructions == ["Write a haiku about autumn leaves.", "Explain photosynthesis to a child.",
                            "List three uses of copper wire."]  # the 4th was cut off by max_tokens
    assert all(r["messages"][1] == {"role": "assistant", "content": "An answer."} for r in rows)
    completions = [b for p, b in fake.requests if p.endswith("/v1/completions")]
    assert completions[0]["prompt"] == stats["pre_query_prefix"] and completions[0]["stop"] == ["<|im_end|>"]
    assert len({b["seed"] for b in completions}) == len(completions)
