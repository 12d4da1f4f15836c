"""GenARM equals, step by step, log p_base + alpha * log p_arm computed with HF + PEFT in float64."""
from __future__ import annotations

import pytest
import torch

from server.engine.engine import RequestError
from server.engine.sequence import SamplingParams
from server.methods.genarm import GenARM
from tests.methods.adapters import float64_merged
from tests.methods.conftest import chat_ids, run_requests, teacher_forced
from tests.methods.numerics import argmax_is_decided, logprob_mismatches

PROMPTS = ["Write a short greeting.", "Give one tip for staying healthy."]


@pytest.fixture(scope="module")
def arm_model(model_dir, method_adapters):
    from transformers import AutoModelForCausalLM

    return float64_merged(model_dir, method_adapters["arm"], AutoModelForCausalLM)


def last_logprobs(model, head_errors, out) -> tuple[torch.Tensor, float]:
    """Float64 next-token log-probs of a forward pass `out` and the fp32 engine's bound on
    its logits' error."""
    # hidden_states[-1] is after the final norm, one more reduction than the layers.
    error = head_errors(out.hidden_states[-1][0, -1], model.config.num_hidden_layers + 1)
    return out.logits[0, -1].log_softmax(-1), error


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_genarm_matches_reference_step_by_step(method_engine, hf_model, arm_model, lm_head_errors, alpha):
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=3)
    jobs = {f"g{i}": (chat_ids(method_engine, p), params, {"method": GenARM("arm", alpha)})
            for i, p in enumerate(PROMPTS)}
    outs = run_requests(method_engine, jobs)
    changed = False
    num_steps = num_decided = 0
    for rid, (ids, _, _) in jobs.items():
        tokens, logprobs = outs[rid]["tokens"][0], outs[rid]["logprobs"][0]
        assert outs[rid]["alignment"]["genarm"]["guided_tokens"] == len(tokens)
        base_outs, arm_outs = teacher_forced(hf_model, ids, tokens), teacher_forced(arm_model, ids, tokens)
        for step, (token, base_out, arm_out) in enumerate(zip(tokens, base_outs, arm_outs)):
            base, base_error = last_logprobs(hf_model, lm_head_errors, base_out)
            arm, arm_error = last_logprobs(arm_model, lm_head_errors, arm_out)  # LoRA on attention: same head
            scores = base + alpha * arm
            # Each log-prob is off by <= 2 max|dz| (numerics.py), the scores by `error`,
            # their log_softmax by twice that.
            error = 2 * base_error + alpha * 2 * arm_error
            reported = logprobs[step].top + [(token, logprobs[step].logprob)]
            bad = logprob_mismatches(reported, scores.log_softmax(-1), 2 * error)
            assert not bad, (rid, step, 2 * error, bad)
            if argmax_is_decided(scores, error):
                num_decided += 1
                assert token == int(scores.argmax()), f"{rid} step {step}"
            changed |= int(scores.argmax()) != int(base.argmax())
            num_steps += 1
    assert changed, "the ARM never changed a greedy choice: the test would not see a wrong combination"
    assert num_decided >= num_steps // 2, (num_steps, num_decided)  # else the token check could not fail
    assert method_engine.kv.pool.num_used_blocks == 0 and not method_engine.seqs


def test_genarm_alpha_zero_is_plain_decoding(method_engine):
    ids = chat_ids(method_engine, PROMPTS[0])
    for params in (SamplingParams(temperature=0.0, max_tokens=12),
                   SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=12)):
        outs = run_requests(method_engine, {"plain": (ids, params, {}),
                                            "arm0": (ids, params, {"method": GenARM("arm", 0.0)})})
        assert outs["arm0"]["tokens"] == outs["plain"]["tokens"]


def test_genarm_batched_and_preempted_equals_alone(model_dir, method_adapters):
    from adapters.peft_format import load_peft_adapter
    from tests.conftest import make_engine

    # 14 blocks of 16 tokens cannot hold four guided requests (two streams each) at once.
    engine = make_engine(model_dir, num_kv_blocks=14, max_num_batched_tokens=64)
    engine.add_adapter("arm", load_peft_adapter(method_adapters["arm"], engine.model_config, 64, "arm"))
    params = SamplingParams(temperature=0.0, max_tokens=20)
    jobs = {f"g{i}": (chat_ids(engine, p), params, {"method": GenARM("arm", 1.0)})
            for i, p in enumerate(PROMPTS + ["Say hello in French.", "What is two plus two?"])}
    alone = {rid: run_requests(engine, {rid: job})[rid]["tokens"] for rid, job in jobs.items()}
    together = run_requests(engine, jobs)
    assert engine.scheduler.num_preemptions > 0
    assert {rid: o["tokens"] for rid, o in together.items()} == alone
    assert engine.kv.pool.num_used_blocks == 0 and not engine.seqs


def test_genarm_n_samples_abort_and_adapter_in_use(method_engine):
    ids = chat_ids(method_engine, PROMPTS[1])
    params = SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=10)
    out = run_requests(method_engine, {"n3": (ids, params, {"method": GenARM("arm", 1.0)})})["n3"]
    assert sorted(out["tokens"]) == [0, 1, 2]
    assert out["alignment"]["genarm"]["guided_tokens"] == sum(len(t) for t in out["tokens"].values()) - 2

    method_engine.add_request("cut", ids, SamplingParams(max_tokens=50, temperature=0.0), method=GenARM("arm", 1.0))
    for _ in range(4):
        method_engine.step()
    with pytest.raises(Exception) as exc:
        method_engine.remove_adapter("arm")
    assert getattr(exc.value, "status", None) == 409
    method_engine.abort_request("cut")
    assert method_engine.kv.pool.num_used_blocks == 0 and not method_engine.seqs and not method_engine.requests
    with pytest.raises(RequestError):
        method_engine.add_request("bad", ids, params, method=GenARM("rm", 1.0))  # a sequence RM cannot guide
    with pytest.raises(RequestError):
        method_engine.add_request("bad", ids, params, method=GenARM("missing", 1.0))
    assert not method_engine.requests


def test_genarm_refuses_requests_whose_two_streams_cannot_fit(model_dir, method_adapters):
    from adapters.peft_format import load_peft_adapter
    from tests.conftest import make_engine

    engine = make_engine(model_dir, num_kv_blocks=9)  # 8 usable blocks of 16 tokens
    engine.add_adapter("arm", load_peft_adapter(method_adapters["arm"], engine.model_config, 64, "arm"))
    ids = chat_ids(engine, PROMPTS[0])
    params = SamplingParams(temperature=0.0, max_tokens=80 - len(ids))  # 5 blocks per stream
    engine.add_request("plain-fits", ids, params)
    engine.abort_request("plain-fits")
    with pytest.raises(RequestError, match="KV blocks"):
        engine.add_request("two-streams", ids, params, method=GenARM("arm", 1.0))
    assert not engine.requests and engine.kv.pool.num_used_blocks == 0
