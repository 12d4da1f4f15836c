"""Engine behaviour on the real model: seeds, n>1 forks, stop strings, prefix cache, taps."""
from __future__ import annotations

import torch

from server.engine.sequence import SamplingParams


def generate(engine, ids: list[int], params: SamplingParams, request_id: str = "r") -> dict[int, dict]:
    engine.add_request(request_id, ids, params)
    outs: dict[int, dict] = {}
    while engine.has_unfinished:
        for d in engine.step():
            if d.request_id != request_id:
                continue
            o = outs.setdefault(d.index, {"tokens": [], "text": "", "finish": None})
            o["tokens"].extend(d.new_token_ids)
            o["text"] += d.text
            o["finish"] = d.finish_reason or o["finish"]
    return outs


def chat(engine, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])


def test_same_seed_same_text_even_in_a_different_batch(engine):
    ids = chat(engine, "Write a story about a dragon.")
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24)
    first = generate(engine, ids, params)[0]["tokens"]
    # Same request alongside another one.
    engine.add_request("other", chat(engine, "Name a color."), SamplingParams(temperature=1.0, max_tokens=30))
    second = generate(engine, ids, params, "again")[0]["tokens"]
    third = generate(engine, ids, SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=24))[0]["tokens"]
    assert first == second
    assert first != third


def test_n_forks_share_prompt_blocks_and_differ(engine):
    ids = chat(engine, "Invent a name for a cat.")
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12)
    engine.add_request("fork", ids, params)
    engine.step()  # prefill + first sample forks the children
    request = engine.requests["fork"]
    tables = [s.block_table for s in request.sequences]
    assert len(tables) == 3
    shared_full = len(ids) // engine.block_size
    assert shared_full > 0
    for t in tables[1:]:
        assert t[:shared_full] == tables[0][:shared_full]  # full prompt blocks shared, not copied
    while engine.has_unfinished:
        engine.step()
    assert engine.kv.pool.num_used_blocks == 0
    outs = generate(engine, ids, params, "fork2")
    assert sorted(outs) == [0, 1, 2]
    assert len({tuple(o["tokens"]) for o in outs.values()}) > 1
    assert outs == generate(engine, ids, params, "fork3")


def test_stop_string_truncates_text(engine):
    ids = chat(engine, "Count from one to ten in words, separated by commas.")
    full = generate(engine, ids, SamplingParams(temperature=0.0, max_tokens=40))[0]
    assert full["finish"] in ("stop", "length")
    text = full["text"]
    assert len(text) > 12
    stop = text[8:11]
    cut = generate(engine, ids, SamplingParams(temperature=0.0, max_tokens=40, stop=(stop,)))[0]
    assert cut["finish"] == "stop"
    assert cut["text"] == text[:text.index(stop)]


def test_max_tokens_gives_length(engine):
    out = generate(engine, chat(engine, "Describe the ocean."), SamplingParams(temperature=0.0, max_tokens=5,
                                                                              ignore_eos=True))[0]
    assert out["finish"] == "length" and len(out["tokens"]) == 5


def test_prefix_cache_hit_gives_same_tokens(engine):
    ids = chat(engine, "Summarize the plot of Hamlet. " * 6)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    first = generate(engine, ids, params)[0]["tokens"]
    engine.add_request("cached", ids, params)
    engine.step()
    seq = engine.requests["cached"].sequences[0]
    hit_tokens = (len(ids) - 1) // engine.block_size * engine.block_size
    assert hit_tokens > 0 and seq.num_computed_tokens == len(ids)
    assert seq.block_table[: hit_tokens // engine.block_size] == [
        engine.kv.pool.lookup(h) for h in seq.block_hashes[: hit_tokens // engine.block_size]]
    while engine.has_unfinished:
        engine.step()
    assert generate(engine, ids, params, "cached2")[0]["tokens"] == first


def test_hidden_state_taps_match_transformers(engine, model_dir):
    from transformers import AutoModelForCausalLM

    ids = chat(engine, "Hello there!")
    engine.add_request("tap", ids, SamplingParams(temperature=0.0, max_tokens=1), tap_layers=(3, -1))
    engine.add_request("notap", chat(engine, "Hi"), SamplingParams(temperature=0.0, max_tokens=1))
    deltas = engine.step()
    by_id = {d.request_id: d for d in deltas}
    assert by_id["notap"].extra is None
    taps = by_id["tap"].extra["taps"]
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        hs = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(taps[3], hs[4][0, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(taps[-1], hs[-1][0, -1], rtol=1e-4, atol=1e-4)
