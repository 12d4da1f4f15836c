"""The scheduler's prefill group: while more than one prompt waits, a step's prefill tokens
(continuing chunks plus new admissions) stop at `prefill_group_tokens`; a lone prompt and decode
rows, and a search's work rows, still get the whole budget. Driven on a real KVCacheManager with exact counts."""
from __future__ import annotations

from server.config import SchedulerConfig
from server.engine.kv_cache import KVCacheManager
from server.engine.scheduler import Scheduler
from tests.engine.test_scheduler_share import make, run_step

BLOCK = 4


def build(group: int, budget: int = 100, max_num_seqs: int = 64) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, prefill_group_tokens=group)
    return Scheduler(config, KVCacheManager(400, BLOCK))


def feed(sched: Scheduler, prompts: list[int]) -> dict:
    seqs = {i: make(i, n) for i, n in enumerate(prompts)}
    for seq in seqs.values():
        sched.add(seq)
    return seqs


def test_a_wave_of_prompts_goes_in_groups():
    sched = build(group=30)
    seqs = feed(sched, [12] * 6)
    # Step 1: 12 + 12 + 6 of the third (30). Step 2: its last 6 continue first (a chunk counts
    # against the group), then 24 new tokens; the two finished prompts decode (1 each, outside it).
    assert run_step(sched, seqs) == {0: 12, 1: 12, 2: 6}
    assert run_step(sched, seqs) == {0: 1, 1: 1, 2: 6, 3: 12, 4: 12}
    # Step 3: one prompt waits: it is alone and takes what it needs.
    assert run_step(sched, seqs) == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 12}


def test_without_a_group_the_wave_fills_the_budget():
    sched = build(group=0)
    seqs = feed(sched, [12] * 6)
    assert run_step(sched, seqs) == {i: 12 for i in range(6)}


def test_a_lone_long_prompt_takes_the_whole_budget():
    sched = build(group=30)
    seqs = feed(sched, [90])
    assert run_step(sched, seqs) == {0: 90}


def test_a_long_chunk_in_progress_holds_back_admissions_but_never_stalls():
    sched = build(group=30, budget=100)
    seqs = feed(sched, [150, 8, 8])
    # Several wait: the long prompt is admitted with the group's 30 tokens.
    assert run_step(sched, seqs) == {0: 30}
    # Its chunk continues with the whole budget left (a running row), which fills the group.
    assert run_step(sched, seqs) == {0: 100}
    # Its last 20 leave 10 of the group: the next prompt gets 8, the third 2.
    assert run_step(sched, seqs) == {0: 20, 1: 8, 2: 2}
    assert run_step(sched, seqs) == {0: 1, 1: 1, 2: 6}


def test_search_work_rows_are_not_grouped():
    # Work rows (a search's branches) have no client waiting on a first token: the whole budget.
    sched = build(group=30, budget=100)
    seqs = {10 + i: make(10 + i, 40, role="work") for i in range(3)}
    for seq in seqs.values():
        sched.add(seq)
    assert run_step(sched, seqs) == {10: 40, 11: 40, 12: 20}


def test_the_group_grows_with_the_decode_batch_to_the_whole_budget():
    # max_num_seqs 8, budget 100: with d rows decoding the group is max(30, 100 * d // 8).
    sched = build(group=30, budget=100, max_num_seqs=8)
    seqs = feed(sched, [5, 5, 5, 5])
    assert run_step(sched, seqs) == {i: 5 for i in range(4)}  # 20 tokens: within any group
    seqs.update({4 + i: make(4 + i, 20) for i in range(3)})
    for i in range(3):
        sched.add(seqs[4 + i])
    # 4 decoding: group max(30, 50) = 50 for the three waiting 20-token prompts: 20 + 20 + 10.
    assert run_step(sched, seqs) == {0: 1, 1: 1, 2: 1, 3: 1, 4: 20, 5: 20, 6: 10}


def test_a_full_decode_batch_lifts_the_group():
    sched = build(group=30, budget=100, max_num_seqs=8)
    seqs = feed(sched, [2] * 7)
    assert run_step(sched, seqs) == {i: 2 for i in range(7)}
    seqs.update({7: make(7, 40), 8: make(8, 40)})
    sched.add(seqs[7])
    sched.add(seqs[8])
    # 7 decoding: group max(30, 87) = 87 of the 93 left; one seat left (max_num_seqs 8), so
    # only the first prompt is admitted, with all 40 of its tokens (a fixed group would give 30).
    assert run_step(sched, seqs) == {**{i: 1 for i in range(7)}, 7: 40}
