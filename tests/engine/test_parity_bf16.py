"""bf16 (what `--dtype auto` picks on AMX / AVX512-BF16 CPUs) against transformers in bf16.

Two bf16 implementations round differently (op order, fused norms, packed matmuls), so token
equality holds only until the first near-tie. The rule is vLLM's `check_logprobs_close`: up to
the first divergence the tokens are equal, and at it each side's token is among the other
side's top-5. Runs on every machine: on CPUs without native bf16 the same code takes the
emulated path.
"""
from __future__ import annotations

import pytest
import torch

from server.engine.sequence import SamplingParams
from tests.conftest import make_engine
from tests.engine.oracle import first_divergence
from tests.engine.test_parity_hf import NEW_TOKENS, PROMPTS, run_alone

TOP_K = 5


@pytest.fixture(scope="module")
def bf16_engine(model_dir):
    return make_engine(model_dir, dtype="bfloat16", num_kv_blocks=256)


@pytest.fixture(scope="module")
def hf_bf16(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()


def hf_greedy_topk(hf_model, prompt_ids: list[int], eos_ids: list[int]) -> tuple[list[int], list[set[int]]]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=eos_ids, pad_token_id=eos_ids[0], output_logits=True,
                                return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    return tokens, [set(step[0].float().topk(TOP_K).indices.tolist()) for step in out.logits]


def test_bf16_greedy_matches_transformers_bf16(bf16_engine, hf_bf16):
    assert bf16_engine.dtype == torch.bfloat16
    eos = sorted(bf16_engine.eos_token_ids)
    for prompt in PROMPTS:
        ids = bf16_engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        ref, ref_top = hf_greedy_topk(hf_bf16, ids, eos)
        ours, logprobs = run_alone(bf16_engine, ids, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                                                    logprobs=TOP_K))
        step = first_divergence(ours, ref)
        if step is None:
            continue
        if step >= min(len(ours), len(ref)):
            raise AssertionError(f"{prompt!r}: one side stopped at step {step} with no token choice to compare")
        our_top = {token for token, _ in logprobs[step].top}
        assert ours[step] in ref_top[step] and ref[step] in our_top, (
            f"{prompt!r} diverges at step {step} beyond the top-{TOP_K} of each other:"
            f"\n ours={ours}\n ref ={ref}")
