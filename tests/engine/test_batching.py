"""Batch invariance, chunked prefill and preemption: every request gives what it gives alone."""
from __future__ import annotations

import pytest

from server.engine.sequence import SamplingParams
from tests.conftest import make_engine
from tests.engine.oracle import check_near_tie_rule

NEW_TOKENS = 32
TOPICS = ["rivers", "volcanoes", "the moon", "bread", "chess", "bees", "glaciers", "jazz",
          "trains", "owls", "copper", "tea", "deserts", "kites", "coral reefs", "violins"]


def prompts(tokenizer) -> list[list[int]]:
    out = []
    for i, topic in enumerate(TOPICS):
        # Lengths vary from a few words to a long paragraph.
        text = f"Tell me something about {topic}." + " Please be precise and friendly." * (i % 6) * 2
        out.append(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
    return out


def run(engine, batch: list[list[int]], params: SamplingParams) -> list[tuple[list[int], list[float]]]:
    """Add all prompts at once and step to completion; return tokens and top-2 gaps per request."""
    for i, ids in enumerate(batch):
        engine.add_request(f"b{i}", ids, params)
    tokens = {i: [] for i in range(len(batch))}
    gaps = {i: [] for i in range(len(batch))}
    while engine.has_unfinished:
        for d in engine.step():
            k = int(d.request_id[1:])
            tokens[k].extend(d.new_token_ids)
            for lp in d.logprobs or []:
                gaps[k].append(lp.top[0][1] - lp.top[1][1])
    return [(tokens[i], gaps[i]) for i in range(len(batch))]


@pytest.fixture(scope="module")
def alone(engine):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=2)
    return [run(engine, [ids], params)[0] for ids in prompts(engine.tokenizer)]


def test_lengths_vary(engine):
    lengths = [len(p) for p in prompts(engine.tokenizer)]
    assert max(lengths) - min(lengths) > 50


def test_batch_invariance_with_chunked_prefill(model_dir, alone):
    # A small token budget forces chunked prefill interleaved with other requests' decodes.
    engine = make_engine(model_dir, max_num_batched_tokens=96)
    batch = run(engine, prompts(engine.tokenizer), SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    results = [(ours, ref, gaps) for (ours, _), (ref, gaps) in zip(batch, alone)]
    check_near_tie_rule(results, max_diverging=2)
    assert engine.kv.pool.num_used_blocks == 0


def test_preemption_under_kv_pressure(model_dir, alone):
    # 24 usable blocks of 16 tokens: far fewer than 16 requests x ~5 blocks need.
    engine = make_engine(model_dir, num_kv_blocks=25)
    batch = run(engine, prompts(engine.tokenizer), SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    assert engine.scheduler.num_preemptions > 0
    assert all(len(tokens) > 0 for tokens, _ in batch)
    results = [(ours, ref, gaps) for (ours, _), (ref, gaps) in zip(batch, alone)]
    check_near_tie_rule(results, max_diverging=2)
    assert engine.kv.pool.num_used_blocks == 0
