"""200 search requests (RAIN in both modes and with model, reward-model and rule evaluators;
reward-guided block search) on the tiny model beside plain ones, up to 8 in flight, each
aborted by its client at a random step unless it finished first: afterwards no KV block, no
sequence and no request is left, and the pool's refcounts are whole again."""
from __future__ import annotations

import random

from server.engine.kv_cache import NULL_BLOCK
from server.engine.sequence import SamplingParams
from server.methods.block_search import BlockSearch, BlockSearchOptions
from server.methods.rain import RAIN, RAINOptions
from tests.methods.test_rain import (PROMPTS, _single_torch_thread, assert_nothing_left, rule, tiny,  # noqa: F401
                                     tiny_dir, tiny_rm)

NUM_SEARCH_REQUESTS = 200
IN_FLIGHT = 8


def search_method(i: int, rng: random.Random):
    if i % 2:
        return BlockSearch(BlockSearchOptions(reward_model="rm", beam_width=rng.choice([2, 3]),
                                              block_tokens=rng.choice([2, 3, 5]), max_blocks=4))
    options = RAINOptions(mode=rng.choice(["batched", "exact"]), evaluator=rng.choice(["self", "rm"]),
                          token_set_size=3, token_set_lengths=[1, 2, 3], max_iterations=3, rollout_max_tokens=3)
    return RAIN(options, rule=rule) if rng.random() < 0.3 else RAIN(options)


def test_two_hundred_aborted_search_requests_leave_nothing(tiny):
    rng = random.Random(7)
    prompts = [tiny.tokenizer.encode(p) for p in PROMPTS]
    deadline: dict[str, int] = {}  # request id -> the step at which its client goes away
    started = aborted = finished = step = 0
    while started < NUM_SEARCH_REQUESTS or tiny.has_unfinished:
        while started < NUM_SEARCH_REQUESTS and len(deadline) < IN_FLIGHT:
            rid = f"s{started}"
            tiny.add_request(rid, rng.choice(prompts), SamplingParams(max_tokens=10, seed=started),
                             method=search_method(started, rng))
            deadline[rid] = step + rng.randint(0, 60)
            if started % 4 == 0:  # plain requests share the batches, and some of them go away too
                tiny.add_request(f"p{started}", rng.choice(prompts), SamplingParams(max_tokens=6))
                deadline[f"p{started}"] = step + rng.randint(0, 20)
            started += 1
        for delta in tiny.step():
            if delta.request_finished and delta.request_id in deadline:
                del deadline[delta.request_id]
                finished += 1
        step += 1
        for rid in [r for r, at in deadline.items() if at <= step]:
            tiny.abort_request(rid)
            del deadline[rid]
            aborted += 1
    assert not deadline
    assert aborted > 50 and finished > 20, (aborted, finished)  # both paths were taken, many times
    assert_nothing_left(tiny)
    assert all(b.ref_count == 0 for b in tiny.kv.pool.blocks if b.block_id != NULL_BLOCK)  # that one is pinned
