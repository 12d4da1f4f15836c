"""A tiny random Mistral with a sliding window: our engine equals transformers past the window."""
from __future__ import annotations

import shutil

import pytest
import torch

from server.config import CacheConfig, EngineConfig, SchedulerConfig
from server.engine.engine import LLMEngine
from server.engine.kv_cache import NULL_BLOCK
from server.engine.sequence import SamplingParams

WINDOW = 24


@pytest.fixture(scope="module")
def tiny_mistral(model_dir, tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM

    out = tmp_path_factory.mktemp("tiny-mistral")
    config = MistralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW,
                           max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    with torch.no_grad():  # a sharper distribution than the tiny init, so argmax is stable
        model.lm_head.weight.mul_(30)
    model.save_pretrained(out)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out, model


def test_matches_transformers_beyond_the_window(tiny_mistral):
    path, hf = tiny_mistral
    hf.config._attn_implementation = "eager"
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu",
                                    cache=CacheConfig(block_size=4, num_kv_blocks=256),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=20, max_model_len=512)))
    assert engine.model_config.sliding_windows == (WINDOW, WINDOW)
    prompt = torch.randint(3, 49152, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    engine.add_request("w", prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=5))
    tokens, logprobs, held = [], [], []
    while engine.has_unfinished:
        for seq in engine.scheduler.running:
            held.append(sum(1 for b in seq.block_table if b != NULL_BLOCK))
        for d in engine.step():
            tokens.extend(d.new_token_ids)
            logprobs.extend(d.logprobs)
    full = torch.tensor([prompt + tokens])
    with torch.no_grad():
        ref = torch.log_softmax(hf(full).logits[0].float(), dim=-1)
    assert len(prompt) + len(tokens) > 3 * WINDOW
    for step, lp in enumerate(logprobs):
        row = ref[len(prompt) - 1 + step]
        for token_id, value in lp.top:
            assert abs(row[token_id].item() - value) < 1e-4, (step, token_id)
        assert lp.token_id == int(row.argmax()) or float(row.topk(2).values.diff().abs()) < 1e-3
    # Memory stays bounded by the window while decoding past it.
    assert max(held[-20:]) <= -(-WINDOW // 4) + 1
