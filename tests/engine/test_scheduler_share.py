"""The scheduler's share rule for search methods' work rows: beside plain rows they feed at most
`work_token_share` tokens per plain token, least recently served first, and never evict a plain
stream; alone they get the whole budget. Driven on a real KVCacheManager with exact counts."""
from __future__ import annotations

import math

import pytest

from server.config import SchedulerConfig
from server.engine.kv_cache import KVCacheManager
from server.engine.scheduler import Scheduler
from server.engine.sequence import Request, SamplingParams, Sequence, SequenceStatus

BLOCK = 4


def make(seq_id: int, num_tokens: int, role: str = "output") -> Sequence:
    tokens = [1000 + seq_id * 100 + i for i in range(num_tokens)]  # distinct: no prefix hits
    req = Request(f"r{seq_id}", tokens, SamplingParams())
    return Sequence(seq_id, req, 0, tokens, num_tokens, role=role)


def run_step(sched: Scheduler, seqs: dict[int, Sequence]) -> dict[int, int]:
    """One schedule + on_step_done, with every scheduled row's sampled token appended (decode
    continues for as many steps as the test runs). Returns seq_id -> tokens fed."""
    out = sched.schedule()
    sched.on_step_done(out, seqs)
    fed = {}
    for s in out.scheduled:
        fed[s.seq_id] = s.num_new_tokens
        seq = seqs[s.seq_id]
        if s.needs_logits:
            seq.token_ids.append(7)
    return fed


def build(num_blocks: int, share: float, budget: int = 512) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=budget, work_token_share=share)
    return Scheduler(config, KVCacheManager(num_blocks, BLOCK))


@pytest.mark.parametrize("share", [1.0, 0.5, 2.0])
def test_work_rows_take_their_share_beside_plain_rows(share):
    sched = build(num_blocks=400, share=share)
    plain = [make(i, 6) for i in range(4)]
    work = [make(10 + i, 40, role="work") for i in range(6)]
    seqs = {s.seq_id: s for s in plain + work}
    for s in plain + work:
        sched.add(s)
    served = dict.fromkeys((s.seq_id for s in work), 0)
    for step in range(40):
        fed = run_step(sched, seqs)
        plain_tokens = sum(n for i, n in fed.items() if seqs[i].role != "work")
        work_tokens = sum(n for i, n in fed.items() if seqs[i].role == "work")
        # Every plain row runs every step: first its whole prompt, then one token.
        assert all(fed.get(p.seq_id) == (6 if step == 0 else 1) for p in plain)
        assert work_tokens <= max(1, math.ceil(share * plain_tokens))
        if step < 20:  # the work rows' prompts (240 tokens) are far from done: the share is used whole
            assert work_tokens == max(1, math.ceil(share * plain_tokens))
        for i in fed:
            if i in served:
                served[i] += 1
    # Least recently served first: after 40 steps no work row lags another by more than a turn.
    assert max(served.values()) - min(served.values()) <= 1, served


def test_work_rows_alone_get_the_whole_budget():
    sched = build(num_blocks=400, share=1.0, budget=100)
    work = [make(10 + i, 40, role="work") for i in range(3)]
    seqs = {s.seq_id: s for s in work}
    for s in work:
        sched.add(s)
    fed = run_step(sched, seqs)
    assert fed == {10: 40, 11: 40, 12: 20}  # arrival order, chunked at the step's budget


def test_plain_rows_preempt_work_rows_and_work_rows_never_evict_plain_ones():
    # 9 usable blocks of 4 tokens: two plain prompts of 8 take 4, a work prompt of 16 takes 4.
    sched = build(num_blocks=10, share=4.0)
    plain = [make(i, 8) for i in range(2)]
    work = make(10, 16, role="work")
    seqs = {s.seq_id: s for s in plain + [work]}
    for s in plain + [work]:
        sched.add(s)
    assert run_step(sched, seqs) == {0: 8, 1: 8, 10: 16}
    # Next step each row needs a new block for its 9th / 17th token, and one is free:
    # plain 0 takes it, plain 1 evicts the work row (the newest row without a place this step).
    assert run_step(sched, seqs) == {0: 1, 1: 1}
    assert work.status == SequenceStatus.WAITING and sched.num_preemptions == 1
    # While blocks stay short the work row recomputes in its share and waits when it cannot grow;
    # the plain rows run every step and are never preempted.
    for _ in range(5):
        fed = run_step(sched, seqs)
        assert set(fed) >= {0, 1}, fed
        assert all(p.status == SequenceStatus.RUNNING for p in plain)
