"""Our decoder equals transformers for the other supported families and RoPE variants."""
from __future__ import annotations

import torch

from tests.models.tiny import check_against_hf, save_tiny, tiny_engine

COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def test_qwen2_with_qkv_bias(model_dir, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(**COMMON, rope_theta=1e6)).eval()
    with torch.no_grad():  # HF inits biases to zero; make them matter
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    engine = tiny_engine(save_tiny(hf, model_dir, tmp_path / "qwen2"))
    assert engine.model_config.attention_bias
    check_against_hf(engine, hf, prompt_len=40, new_tokens=12)


def test_llama3_rope_scaling(model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters=rope)).eval()
    engine = tiny_engine(save_tiny(hf, model_dir, tmp_path / "llama3"))
    default = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    assert not torch.allclose(torch.tensor(engine.model_config.inv_freq), default)  # scaling applied
    check_against_hf(engine, hf, prompt_len=100, new_tokens=12)
