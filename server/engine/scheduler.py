"""Continuous-batching scheduler: one token budget, running sequences first, then waiting.

Each sequence is a computed-token counter catching up to its length, so chunked
prefill, prefix-cache hits, decode, forks, rewinds and recompute after preemption are
one loop. When blocks run out the newest running sequence is preempted (its blocks
freed, recomputed later); no request fails for KV pressure.
"""
from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING

from server.config import SchedulerConfig
from server.engine.kv_cache import KVCacheManager
from server.engine.messages import ScheduledSequence, SchedulerOutput
from server.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from adapters.registry import AdapterRegistry


class Scheduler:
    """Decides which sequences run each step and how many tokens each feeds."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 adapters: "AdapterRegistry | None" = None) -> None:
        self.config = config
        self.kv = kv
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_steps = 0  # schedule() calls, to order work rows by when they last ran

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a forked child that already shares its parent's computed blocks."""
        if not self._hold_adapter(seq):
            raise RuntimeError("a forked child could not pin the adapter its parent holds")
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _hold_adapter(self, seq: Sequence) -> bool:
        """Pin the sequence's adapter in a device slot while it runs (False: no free slot)."""
        if seq.adapter_id == 0 or seq.holds_adapter:
            return True
        assert self.adapters is not None, "adapter request on an engine without adapters"
        seq.holds_adapter = self.adapters.acquire(seq.adapter_id)
        return seq.holds_adapter

    def _drop_adapter(self, seq: Sequence) -> None:
        if seq.holds_adapter and self.adapters is not None:
            self.adapters.release(seq.adapter_id)
            seq.holds_adapter = False

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        self._drop_adapter(seq)
        if seq.paused:  # parked: queued again when its method resumes it
            seq.status = SequenceStatus.PARKED
        else:
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        self.num_steps += 1

        # Plain rows (outputs and their shadows) first. A search method's work rows come after,
        # within a share of what the plain rows took: a search multiplies its rows by its beam or
        # its evaluations, and must not multiply everyone else's time per token with them.
        budget = self._schedule_running(out, scheduled, budget, work=False)
        budget = self._admit_waiting(out, scheduled, budget, work=False)
        plain_tokens = self.config.max_num_batched_tokens - budget
        if plain_tokens == 0:
            budget = self._schedule_running(out, scheduled, budget, work=True)
            self._admit_waiting(out, scheduled, budget, work=True)
        else:
            share = max(1, math.ceil(self.config.work_token_share * plain_tokens))
            self._schedule_work_share(out, scheduled, min(budget, share))

        for seq, num_new in scheduled:
            start = seq.num_computed_tokens
            out.scheduled.append(ScheduledSequence(
                seq_id=seq.seq_id,
                token_ids=seq.token_ids[start:start + num_new],
                start=start,
                block_table=list(seq.block_table),
                adapter_id=seq.adapter_id,
                needs_logits=start + num_new == seq.num_tokens,
                tap_layers=seq.tap_layers,
                prompt_taps=seq.params.prompt_taps if start < seq.num_prompt_tokens else (),
                num_prompt_tokens=seq.num_prompt_tokens,
            ))
        out.copy_blocks = self.kv.take_copies()
        return out

    def _schedule_running(self, out: SchedulerOutput, scheduled: list[tuple[Sequence, int]], budget: int,
                          work: bool) -> int:
        """Feed running sequences of one kind (work or plain) in running order their pending
        tokens within `budget`; return what is left. When blocks run out the newest running
        sequence without a row in this step is preempted."""
        for seq in [s for s in self.running if (s.role == "work") == work]:
            if budget <= 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted by an earlier row of this loop
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0 or seq.paused:
                continue
            while not self.kv.allocate_slots(seq, num_new):
                victim = self._pop_unscheduled(scheduled)
                self._preempt(victim)
                out.preempted_seq_ids.append(victim.seq_id)
                if victim is seq:
                    break
            else:
                scheduled.append((seq, num_new))
                seq.last_scheduled_step = self.num_steps
                budget -= num_new
        return budget

    def _schedule_work_share(self, out: SchedulerOutput, scheduled: list[tuple[Sequence, int]],
                             budget: int) -> None:
        """Work rows beside plain rows: running and waiting alike, least recently served first
        (so every branch and every search request moves), within `budget`. They never preempt:
        when blocks run out they wait, and a search never evicts a plain stream."""
        waiting_ok = not out.preempted_seq_ids
        num_active = sum(1 for s in self.running if not s.paused)
        candidates = [s for s in self.running if s.role == "work" and not s.paused]
        if waiting_ok:
            candidates += [s for s in self.waiting if s.role == "work"]
        candidates.sort(key=lambda s: s.last_scheduled_step)
        for seq in candidates:
            if budget <= 0:
                return
            if seq.status == SequenceStatus.RUNNING:
                num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if num_new <= 0:
                    continue
                if not self.kv.allocate_slots(seq, num_new):
                    return
                seq.last_scheduled_step = self.num_steps
            else:
                if num_active >= self.config.max_num_seqs:
                    continue
                num_new = self._admit(seq, budget)
                if num_new is None:
                    continue  # its adapter has no slot or its blocks do not fit: the next may
                num_active += 1
            scheduled.append((seq, num_new))
            budget -= num_new

    def _pop_unscheduled(self, scheduled: list[tuple[Sequence, int]]) -> Sequence:
        """Remove and return the newest running sequence that has no row in this step."""
        taken = {s.seq_id for s, _ in scheduled}
        for i in range(len(self.running) - 1, -1, -1):
            if self.running[i].seq_id not in taken:
                return self.running.pop(i)
        raise RuntimeError("no running sequence left to preempt")

    def _admit_waiting(self, out: SchedulerOutput, scheduled: list[tuple[Sequence, int]], budget: int,
                       work: bool) -> int:
        """Admit waiting sequences of one kind in arrival order, only when nothing was preempted
        this step (no thrashing). Paused sequences hold blocks but no batch row, so they do not
        count against max_num_seqs."""
        if out.preempted_seq_ids:
            return budget
        num_active = sum(1 for s in self.running if not s.paused)
        candidates = [s for s in self.waiting if (s.role == "work") == work]
        # Plain rows only: the group is for the first tokens a client waits on; work rows have none.
        grouped = not work and len(candidates) > 1
        admit_budget = self._prefill_group_left(scheduled, budget) if grouped else budget
        for seq in candidates:
            if admit_budget <= 0 or num_active >= self.config.max_num_seqs:
                break
            num_new = self._admit(seq, admit_budget)
            if num_new is None:
                break  # no adapter slot or no blocks: later arrivals wait too
            num_active += 1
            scheduled.append((seq, num_new))
            budget -= num_new
            admit_budget -= num_new
        return budget

    def _prefill_group_left(self, scheduled: list[tuple[Sequence, int]], budget: int) -> int:
        """Tokens new admissions may take while several prompts wait: what the step's prefill
        group has left after the chunks already in it (rows of more than one token), within
        `budget`. Why: a burst prefilled in one big step also finishes together, so the requests
        that replace it arrive together and wait for the next big step; in groups it ends a step
        apart and what follows arrives a few at a time, each few starting in the next step
        (bench/results/serve_waves_2026-12-06). The burst itself gains little: small steps cost
        more per token.

        The group grows with the step's decode rows, to the whole step budget at max_num_seqs of
        them: with a full batch every step is long anyway, and there the group only cost
        throughput (closed loop at c = 64, 128 requests: 400 vs 489 tokens/s with it and without,
        while at c = 16 it bought TTFT p50 373 vs 834 ms;
        bench/results/serve_ab_prefill_group_true_c64_2026-12-06.*)."""
        group = self.config.prefill_group_tokens
        if group <= 0:
            return budget
        decoding = sum(1 for _, n in scheduled if n == 1)
        group = max(group, self.config.max_num_batched_tokens * decoding // self.config.max_num_seqs)
        in_prefill = sum(n for _, n in scheduled if n > 1)
        return min(budget, max(0, group - in_prefill))

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Move a waiting sequence to running with up to `budget` new tokens (its prefix-cache
        hits first); the tokens it feeds, or None when its adapter has no free slot or its
        blocks do not fit (nothing is then held)."""
        if not self._hold_adapter(seq):
            return None  # every adapter slot is pinned by running sequences: wait for one
        hits = self.kv.match_prefix(seq) if seq.num_computed_tokens == 0 else []
        num_computed = seq.num_computed_tokens + len(hits) * self.kv.block_size
        num_new = min(seq.num_tokens - num_computed, budget)
        if not self.kv.allocate_slots(seq, num_new, hits):
            self._drop_adapter(seq)
            return None
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        seq.last_scheduled_step = self.num_steps
        self.running.append(seq)
        return num_new

    def on_step_done(self, out: SchedulerOutput, seqs: dict[int, Sequence]) -> None:
        """Advance computed counters and publish newly full blocks to the prefix cache."""
        for s in out.scheduled:
            seq = seqs[s.seq_id]
            seq.num_computed_tokens = s.start + s.num_new_tokens
            self.kv.cache_computed_blocks(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and free its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status = SequenceStatus.FINISHED
        self.kv.free(seq)
        self._drop_adapter(seq)
