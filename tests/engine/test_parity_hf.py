"""Oracle: our engine's greedy tokens equal Hugging Face transformers `generate` on the same weights."""
from __future__ import annotations

import pytest
import torch

from server.engine.sequence import SamplingParams
from tests.engine.oracle import check_near_tie_rule, hf_greedy

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue? Answer briefly, please, because I am in a hurry and need it fast.",
    "Give me a short motivational quote about learning to program in Rust.",
]
NEW_TOKENS = 48


def run_alone(engine, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], list]:
    request = engine.add_request(f"alone-{id(prompt_ids)}", prompt_ids, params)
    tokens: list[int] = []
    logprobs: list = []
    while engine.has_unfinished:
        for d in engine.step():
            tokens.extend(d.new_token_ids)
            logprobs.extend(d.logprobs or [])
    assert request.request_id not in engine.requests
    return tokens, logprobs


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def test_greedy_matches_transformers(engine, hf_model):
    results = []
    eos = sorted(engine.eos_token_ids)
    for prompt in PROMPTS:
        ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        ref, gaps = hf_greedy(hf_model, ids, NEW_TOKENS, eos)
        ours, _ = run_alone(engine, ids, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
        results.append((ours, ref, gaps))
    assert sum(len(r[1]) for r in results) >= 8 * 20, "reference generations are suspiciously short"
    check_near_tie_rule(results, max_diverging=1)
