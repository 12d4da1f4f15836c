"""Sequence lifecycle: create, fork, extend, rewind, commit, release, finish, forget.

These are the engine's public primitives for test-time methods; a method reaches them
through server/methods/search.py's SearchContext, never through LLMEngine. Every operation
keeps three things consistent: the KV blocks (refcounts, copy-on-write), the scheduler's
queues, and the text state (server/engine/output.py). A request owns its outputs
(`request.sequences`, streamed) and its auxiliary sequences (`request.aux`: shadows and work
sequences, whose text is held until committed into an output).
"""
from __future__ import annotations

import hashlib

import torch

from server.engine.kv_cache import KVCacheManager
from server.engine.messages import SequenceDelta
from server.engine.output import OutputProcessor
from server.engine.scheduler import Scheduler
from server.engine.sequence import Request, Sequence, SequenceStatus, next_seq_id


def seed_for(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SequenceLifecycle:
    """Owns every live sequence (`seqs`) and the operations that change one."""

    # Work sequences draw seeds from indices past any output index (n <= 16, best_of <= 32).
    WORK_SEED_BASE = 1 << 20

    def __init__(self, kv: KVCacheManager, scheduler: Scheduler, outputs: OutputProcessor, seed: int) -> None:
        self.kv = kv
        self.scheduler = scheduler
        self.outputs = outputs
        self.seqs: dict[int, Sequence] = {}
        self._rng = torch.Generator().manual_seed(seed)

    # ---- creation --------------------------------------------------------------------
    def new_output(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        seq = Sequence(next_seq_id(), request, index, list(token_ids), len(request.prompt_token_ids))
        seq.tap_layers = request.tap_layers
        self._seed(seq, index)
        self.outputs.start(seq)
        request.sequences.append(seq)
        self.seqs[seq.seq_id] = seq
        return seq

    def spawn(self, request: Request, token_ids: list[int], adapter_id: int | None = None,
              tap_layers: tuple[int, ...] = ()) -> Sequence:
        """A paused work sequence over arbitrary tokens (its own prompt), e.g. an evaluation
        prompt. It is parked until a method asks for something of it; its prefill then hits
        the prefix cache for every full block another sequence computed."""
        seq = Sequence(next_seq_id(), request, -1, list(token_ids), len(token_ids), role="work",
                       adapter_override=adapter_id, paused=True, tap_layers=tap_layers,
                       status=SequenceStatus.PARKED)
        self._add_work(request, seq)
        return seq

    def fork(self, seq: Sequence, k: int, role: str = "work", paused: bool | None = None,
             seed_indices: list[int] | None = None) -> list[Sequence]:
        """k copy-on-write children of `seq` at its current length: same tokens, KV blocks,
        text state and logprobs; nothing is copied until a child writes. Work children start
        paused (their method says what to do next), outputs unless `paused` says otherwise.
        `seed_indices`: seed the children as outputs with these indices would be (so a search's
        candidates can reproduce what n > 1 samples)."""
        paused = role == "work" if paused is None else paused
        children = []
        for i in range(k):
            child = Sequence(next_seq_id(), seq.request, seq.index, list(seq.token_ids), seq.num_prompt_tokens,
                             role=role, adapter_override=seq.adapter_override, tap_layers=seq.tap_layers,
                             params_override=seq.params_override, paused=paused)
            child.detok = seq.detok.fork()
            child.output_text, child.logprobs = seq.output_text, list(seq.logprobs)
            child.finish_reason = seq.finish_reason
            if role == "output":
                child.index = len(seq.request.sequences)
                self._seed(child, child.index)
                seq.request.sequences.append(child)
                self.seqs[child.seq_id] = child
            else:
                self._add_work(seq.request, child)
            if seed_indices is not None:
                self._seed(child, seed_indices[i])
            if seq.status == SequenceStatus.RUNNING:
                self.kv.fork(seq, child)
                self.scheduler.add_running(child)
            elif child.paused:
                child.status = SequenceStatus.PARKED
            else:
                self.scheduler.add(child)  # a waiting parent has nothing computed to share
            children.append(child)
        return children

    def add_shadow(self, primary: Sequence, adapter_id: int, fork_from: Sequence | None = None) -> Sequence:
        """Give `primary` a lockstep twin under another adapter: it is fed every token the
        primary samples, produces its own logits, and is never an output. `fork_from` shares
        an existing shadow's blocks (n > 1 children)."""
        shadow = Sequence(next_seq_id(), primary.request, primary.index, list(primary.token_ids),
                          primary.num_prompt_tokens, adapter_override=adapter_id, role="shadow")
        primary.shadow = shadow
        primary.request.aux.append(shadow)
        self.seqs[shadow.seq_id] = shadow
        if fork_from is None:
            self.scheduler.add(shadow)
        else:
            self.kv.fork(fork_from, shadow)
            self.scheduler.add_running(shadow)
        return shadow

    def _add_work(self, request: Request, seq: Sequence) -> None:
        self._seed(seq, self.WORK_SEED_BASE + request.num_spawned)
        request.num_spawned += 1
        if seq.detok is None:
            self.outputs.start(seq)
        request.aux.append(seq)
        self.seqs[seq.seq_id] = seq

    def _seed(self, seq: Sequence, index: int) -> None:
        params = seq.request.params
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._rng))
        seq.seed, seq.num_draws = seed_for(seed, index), 0  # a fresh stream of draws

    # ---- moving a sequence ------------------------------------------------------------
    def extend(self, seq: Sequence, token_ids: list[int]) -> None:
        """Append tokens that were not sampled; they are prefilled on the next step. They go
        through output processing (text, stop strings) like sampled ones."""
        for token in token_ids:
            self.outputs.append(seq, token, None)

    def rewind(self, seq: Sequence, num_tokens: int) -> None:
        """Back `num_tokens` tokens: KV blocks (refcounts; a shared partial block is copied on
        its next write), text, logprobs, stop and finish state, and the shadow."""
        new_len = seq.num_tokens - num_tokens
        if num_tokens < 0 or new_len < seq.num_prompt_tokens:
            raise ValueError(f"cannot rewind {num_tokens} tokens of a sequence with "
                             f"{seq.num_output_tokens} output tokens")
        self.outputs.rewind(seq, new_len)
        self.kv.truncate(seq, new_len)
        if seq.shadow is not None:
            self.kv.truncate(seq.shadow, new_len)

    def recompute_last(self, seq: Sequence) -> None:
        """Make the last token pending again, so the next step yields its logits (the row is
        gone once computed); its K/V slot is rewritten, copy-on-write if shared."""
        if seq.num_computed_tokens >= seq.num_tokens:
            seq.num_computed_tokens = seq.num_tokens - 1
            seq.num_cached_blocks = min(seq.num_cached_blocks, seq.num_computed_tokens // self.kv.block_size)

    def unpause(self, seq: Sequence) -> None:
        """Let a paused sequence be scheduled again (queued if it was parked)."""
        seq.paused = False
        if seq.status == SequenceStatus.PARKED:
            self.scheduler.add(seq)

    def commit(self, output: Sequence, source: Sequence, upto: int | None = None) -> SequenceDelta | None:
        """Make `output` (an output sequence) continue as `source` does up to `upto` tokens,
        sharing its KV blocks, and release the new text to the client. `source` must extend
        `output`'s tokens. Returns the delta to stream (None if nothing new)."""
        upto = source.num_tokens if upto is None else upto
        if output.role != "output" or source.token_ids[:output.num_tokens] != output.token_ids:
            raise ValueError("commit: the source does not continue this output")
        old_len = output.num_tokens
        new_tokens = source.token_ids[old_len:upto]
        if not new_tokens:
            return None
        if source.status == SequenceStatus.RUNNING:  # share its KV; else recompute from the cache
            self.kv.free(output)
            output.token_ids = list(source.token_ids)
            self.kv.fork(source, output)
            self.kv.truncate(output, upto)
            del output.token_ids[old_len:]
        output.paused = True  # an output of a search advances only by commits
        first = old_len - output.num_prompt_tokens  # output index of the first new token
        emitted, logprobs = [], []
        for k, token in enumerate(new_tokens):
            lp = source.logprobs[first + k] if first + k < len(source.logprobs) else None
            emitted.append(token)
            if lp is not None:
                logprobs.append(lp)
            if self.outputs.append(output, token, lp) is not None:
                break
        return self.emit(output, emitted, self.outputs.release(output), logprobs)

    def emit(self, output: Sequence, token_ids: list[int], text: str, logprobs: list) -> SequenceDelta:
        request = output.request
        finished = False
        if output.finish_reason is not None:
            self.finish(output, output.finish_reason)
            request.num_finished += 1
            finished = request.num_finished == len(request.sequences)
        return self.outputs.delta(output, token_ids, text, logprobs, finished)

    def finish_output(self, output: Sequence, reason: str) -> SequenceDelta:
        """End an output where it stands (a method's decision), releasing any held tail."""
        output.finish_reason = reason
        return self.emit(output, [], self.outputs.release(output), [])

    # ---- ending ----------------------------------------------------------------------
    def release(self, seq: Sequence) -> None:
        """Drop a work sequence and its blocks."""
        if seq.role == "output":
            raise ValueError("release: outputs are finished, not released")
        self.scheduler.finish(seq)
        self.seqs.pop(seq.seq_id, None)
        if seq in seq.request.aux:
            seq.request.aux.remove(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop a sequence (and its shadow) and free its blocks; it stays known until forgotten."""
        for s in (seq, seq.shadow):
            if s is not None and not s.is_finished:
                s.finish_reason = reason
                self.scheduler.finish(s)

    def forget(self, request: Request) -> None:
        """Drop every sequence of a finished or aborted request."""
        for seq in request.sequences + request.aux:
            self.finish(seq, seq.finish_reason or "abort")
            self.seqs.pop(seq.seq_id, None)
        request.aux.clear()
