"""Reward-model scoring through the engine equals HF + PEFT's sequence classifier (float64)."""
from __future__ import annotations

import math

from server.methods.best_of_n import kl_bound, rank, strip_padding
from tests.methods.adapters import reward_and_error, reward_model
from tests.methods.conftest import chat_ids

REPLIES = ["Paris is the capital of France.", "I don't know.", "The capital is Paris, on the Seine."]


def test_engine_scores_equal_hf_reward_model(method_engine, model_dir, method_adapters):
    tok = method_engine.tokenizer
    question = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = [tok.apply_chat_template(question + [{"role": "assistant", "content": r}], add_generation_prompt=False)
              for r in REPLIES]
    rm_id = method_engine.resolve_adapter("rm", role="rm")
    for i, ids in enumerate(inputs):  # all at once: they batch and share the prompt's cached blocks
        method_engine.add_score_request(f"s{i}", ids, rm_id)
    scores = {}
    while method_engine.has_unfinished:
        for d in method_engine.step():
            scores[d.request_id] = d.extra["score"][0]
    hf = reward_model(model_dir, method_adapters["rm"])
    expected, errors = zip(*(reward_and_error(hf, ids) for ids in inputs))
    ours = [scores[f"s{i}"] for i in range(len(inputs))]
    assert all(abs(a - b) <= e for a, b, e in zip(ours, expected, errors)), (ours, expected, errors)
    ranked = sorted(expected)
    assert min(b - a for a, b in zip(ranked, ranked[1:])) > 2 * max(errors), "replies must score apart"
    assert method_engine.kv.pool.num_used_blocks == 0 and not method_engine.requests


def test_score_requests_refuse_non_reward_adapters(method_engine):
    import pytest

    from server.engine.engine import RequestError

    ids = chat_ids(method_engine, "hi")
    with pytest.raises(RequestError):
        method_engine.resolve_adapter("arm", role="rm")
    with pytest.raises(RequestError):
        method_engine.add_score_request("x", ids, method_engine.resolve_adapter("arm"))
    with pytest.raises(RequestError):
        method_engine.resolve_adapter("rm")  # a reward model cannot generate
    assert not method_engine.requests


def test_rank_padding_and_bound():
    assert rank([0.1, 0.5, 0.5, -1.0]) == [1, 2, 0, 3]
    assert strip_padding([5, 6, 2, 2], 2) == [5, 6]
    assert strip_padding([2], 2) == [2]
    assert strip_padding([5, 2], None) == [5, 2]
    assert kl_bound(1) == 0.0
    assert math.isclose(kl_bound(8), math.log(8) - 7 / 8)
