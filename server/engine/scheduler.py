"""Continuous-batching scheduler: one token budget, running sequences first, then waiting.

Each sequence is a computed-token counter catching up to its length, so chunked
prefill, prefix-cache hits, decode, forks, rewinds and recompute after preemption are
one loop. When blocks run out the newest running sequence is preempted (its blocks
freed, recomputed later); no request fails for KV pressure.
"""
from __future__ import annotations

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

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0 or seq.paused:
                i += 1
                continue
            while not self.kv.allocate_slots(seq, num_new):
                # NOTE: victims come from the tail, which holds no sequence scheduled yet.
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_seq_ids.append(victim.seq_id)
                if victim is seq:
                    break
            else:
                scheduled.append((seq, num_new))
                budget -= num_new
                i += 1

        # Admit waiting sequences only when nothing was preempted this step (no thrashing).
        # Paused sequences hold blocks but no batch row, so they do not count against max_num_seqs.
        num_active = sum(1 for s in self.running if not s.paused)
        while (self.waiting and budget > 0 and not out.preempted_seq_ids
               and num_active < self.config.max_num_seqs):
            seq = self.waiting[0]
            if not self._hold_adapter(seq):
                break  # every adapter slot is pinned by running sequences: wait for one
            hits = self.kv.match_prefix(seq) if seq.num_computed_tokens == 0 else []
            num_computed = seq.num_computed_tokens + len(hits) * self.kv.block_size
            num_new = min(seq.num_tokens - num_computed, budget)
            if not self.kv.allocate_slots(seq, num_new, hits):
                self._drop_adapter(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_active += 1
            scheduled.append((seq, num_new))
            budget -= num_new

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
