"""Reward-guided block search on the engine, checked against HF + PEFT's reward model."""
from __future__ import annotations

import random

from server.engine.sequence import SamplingParams
from server.methods.block_search import BlockSearch, BlockSearchOptions
from tests.methods.adapters import reward_and_error, reward_model
from tests.methods.conftest import chat_ids, run_requests

QUESTION = "Suggest a name for a pet cat."


def renderer(engine, text: str):
    messages = [{"role": "user", "content": text}]
    return lambda reply: engine.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}],
                                                              add_generation_prompt=False)


def search(engine, params, **options):
    method = BlockSearch(BlockSearchOptions(reward_model="rm", **options), renderer(engine, QUESTION),
                         engine.tokenizer.hf.pad_token_id)
    out = run_requests(engine, {"s": (chat_ids(engine, QUESTION), params, {"method": method})})["s"]
    return out, out["alignment"]["search"]


def test_beam_of_one_at_temperature_zero_is_greedy_decoding(method_engine):
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    plain = run_requests(method_engine, {"p": (chat_ids(method_engine, QUESTION), greedy, {})})["p"]
    out, report = search(method_engine, greedy, beam_width=1, block_tokens=5, max_blocks=10)
    assert out["tokens"][0] == plain["tokens"][0]
    assert report["num_blocks"] == -(-len(plain["tokens"][0]) // 5)
    assert method_engine.kv.pool.num_used_blocks == 0 and not method_engine.requests


def test_each_block_commits_the_hf_reward_argmax(method_engine, model_dir, method_adapters):
    """Every candidate's reward equals HF's float64 RM on the rendered partial reply within the
    float32 error bound; the committed block is the server's argmax, HF's unless rounding could
    reorder them; the output is the chosen blocks in order."""
    params = SamplingParams(max_tokens=18, temperature=1.0, seed=3)
    out, report = search(method_engine, params, beam_width=3, block_tokens=6, max_blocks=3)
    hf = reward_model(model_dir, method_adapters["rm"])
    render = renderer(method_engine, QUESTION)
    text_so_far = ""
    for block in report["blocks"]:
        rewards = [c["reward"] for c in block["candidates"]]
        expected = [reward_and_error(hf, render(text_so_far + c["text"])) for c in block["candidates"]]
        assert all(abs(r - e) <= err for r, (e, err) in zip(rewards, expected)), (rewards, expected)
        chosen = block["chosen"]
        assert chosen == max(range(len(rewards)), key=lambda i: (rewards[i], -i))
        winner = max(range(len(expected)), key=lambda i: (expected[i][0], -i))
        assert expected[winner][0] - expected[chosen][0] <= expected[winner][1] + expected[chosen][1]
        text_so_far += block["candidates"][chosen]["text"]
    assert len({c["text"] for b in report["blocks"] for c in b["candidates"]}) > 1  # branches differ
    assert method_engine.tokenizer.decode(out["tokens"][0]) == text_so_far
    assert method_engine.kv.pool.num_used_blocks == 0


def test_aborted_searches_free_everything(method_engine):
    rng = random.Random(1)
    ids = chat_ids(method_engine, QUESTION)
    for i in range(10):
        method = BlockSearch(BlockSearchOptions(reward_model="rm", beam_width=3, block_tokens=4))
        method_engine.add_request(f"a{i}", ids, SamplingParams(max_tokens=32, temperature=1.0), method=method)
        for _ in range(rng.randint(0, 30)):
            method_engine.step()
        method_engine.abort_request(f"a{i}")
    while method_engine.has_unfinished:
        method_engine.step()
    assert method_engine.kv.pool.num_used_blocks == 0 and not method_engine.seqs
