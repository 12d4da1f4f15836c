"""A tiny random Mistral with a sliding window: our engine equals transformers past the window."""
from __future__ import annotations

import torch

from tests.models.tiny import check_against_hf, save_tiny, tiny_engine

WINDOW = 24


def test_matches_transformers_beyond_the_window(model_dir, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW,
                           max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    torch.manual_seed(0)
    hf = MistralForCausalLM(config).eval()
    engine = tiny_engine(save_tiny(hf, model_dir, tmp_path / "mistral"))
    assert engine.model_config.sliding_windows == (WINDOW, WINDOW)
    held = check_against_hf(engine, hf, prompt_len=70, new_tokens=30)
    # 100 tokens > 4 windows; memory stays bounded by the window while decoding past it.
    assert max(held[-20:]) <= -(-WINDOW // 4) + 1
