"""SearchMethod: a driver that runs one request over many engine steps through SearchContext.

A search method is a generator, `run(ctx)`. It works on sequences with the engine's
primitives (fork, spawn, extend, rewind, commit, release; server/engine/lifecycle.py) and
yields a wait whenever it needs the model: `ctx.readout(seqs)` (next-token logits and taps),
`ctx.sample(seqs, k)` (sample up to k tokens each), `ctx.score(token_lists, adapter)` (a
reward-model head). The engine keeps stepping every other request meanwhile; the waiting
sequences simply join its batches, and the driver resumes between steps once its wait is
met. Work sequences hold their text; `ctx.commit` moves tokens into an output and streams
them. The driver therefore never blocks the engine loop, and engine.py knows no method.
"""
from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from server.engine.messages import SequenceDelta
from server.engine.sequence import SamplingParams, Sequence
from server.methods.base import LogitMethod
from server.models.llama import FINAL_NORM_TAP

if TYPE_CHECKING:
    from server.engine.engine import LLMEngine
    from server.engine.sequence import Request

logger = logging.getLogger(__name__)


@dataclass
class Readout:
    """A sequence's next-token logits (float32 [vocab]) and the taps it asked for."""

    logits: torch.Tensor
    taps: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def logprobs(self) -> torch.Tensor:
        return self.logits.log_softmax(-1)


class Wait:
    """What a driver waits for; `done()` is checked between steps, `result()` is sent back."""

    def done(self) -> bool:
        raise NotImplementedError

    def result(self) -> Any:
        raise NotImplementedError


class ReadoutWait(Wait):
    def __init__(self, seqs: list[Sequence], results: dict[int, Readout]) -> None:
        self.seqs, self.results = seqs, results

    def done(self) -> bool:
        return all(s.seq_id in self.results for s in self.seqs)

    def result(self) -> list[Readout]:
        return [self.results.pop(s.seq_id) for s in self.seqs]


class SampleWait(Wait):
    def __init__(self, seqs: list[Sequence]) -> None:
        self.seqs = seqs
        self.start = [s.num_tokens for s in seqs]

    def done(self) -> bool:
        return all(s.paused for s in self.seqs)

    def result(self) -> list[list[int]]:
        return [s.token_ids[n:] for s, n in zip(self.seqs, self.start)]


class ScoreWait(Wait):
    def __init__(self, ctx: "SearchContext", seqs: list[Sequence], head: torch.Tensor) -> None:
        self.ctx, self.seqs, self.head = ctx, seqs, head
        self.inner = ctx.readout(seqs)

    def done(self) -> bool:
        return self.inner.done()

    def result(self) -> list[float]:
        hidden = [r.taps[FINAL_NORM_TAP] for r in self.inner.result()]
        for seq in self.seqs:
            self.ctx.release(seq)
        head = self.head
        return [float((h.to(head.device, head.dtype) @ head.T).float()[0]) for h in hidden]


class SearchContext:
    """The narrow interface a search method gets: its request's sequences and primitives."""

    def __init__(self, engine: "LLMEngine", request: "Request") -> None:
        self._engine = engine
        self._life = engine.lifecycle
        self.request = request
        self.tokenizer = engine.tokenizer
        self.eos_token_ids = frozenset(engine.eos_token_ids)
        self.readouts: dict[int, Readout] = {}
        self.released: list[SequenceDelta] = []  # deltas from commits, handed to the engine

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    def output(self, index: int = 0) -> Sequence:
        return self.request.sequences[index]

    # ---- immediate primitives ------------------------------------------------------------
    def fork(self, seq: Sequence, k: int, role: str = "work", seed_indices: list[int] | None = None,
             params: SamplingParams | None = None) -> list[Sequence]:
        """k copy-on-write children; outputs made this way stay paused (they move by commits)."""
        children = self._life.fork(seq, k, role=role, paused=True, seed_indices=seed_indices)
        for child in children:
            if params is not None:
                child.params_override = params
        return children

    def spawn(self, token_ids: list[int], adapter_id: int | None = None,
              tap_layers: tuple[int, ...] = ()) -> Sequence:
        return self._life.spawn(self.request, token_ids, adapter_id, tap_layers)

    def extend(self, seq: Sequence, token_ids: list[int]) -> None:
        self._life.extend(seq, token_ids)

    def count_generated(self, num_tokens: int) -> None:
        """Tokens the driver drew itself (from a readout) count as generated, in usage and metrics."""
        self._engine.num_generation_tokens += num_tokens
        self.request.num_generated += num_tokens

    def rewind(self, seq: Sequence, num_tokens: int) -> None:
        self._life.rewind(seq, num_tokens)

    def release(self, seq: Sequence) -> None:
        self.readouts.pop(seq.seq_id, None)
        self._life.release(seq)

    def commit(self, output: Sequence, source: Sequence, upto: int | None = None) -> None:
        delta = self._life.commit(output, source, upto)
        if delta is not None:
            self.released.append(delta)

    def finish(self, output: Sequence, reason: str = "stop") -> None:
        if not output.is_finished:
            self.released.append(self._life.finish_output(output, reason))

    def sample_from(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token for each of `seqs` from one logits row (e.g. the root's readout),
        with each sequence's own generator and settings: what n > 1 does at its fork. The
        sequences' constraints and logit rules apply, as in the engine's step (a readout is raw)."""
        from server.engine.constraints import constrain
        from server.engine.sampler import sample

        rows = constrain(logits.unsqueeze(0).expand(len(seqs), -1).contiguous(), seqs)
        tokens, logprobs = sample(rows, seqs)
        for seq, token, lp in zip(seqs, tokens, logprobs):
            self.count_generated(1)
            self._life.outputs.append(seq, token, lp)

    # ---- waits (yield them) ----------------------------------------------------------------
    def readout(self, seqs: list[Sequence]) -> Wait:
        for seq in seqs:
            seq.wants_readout = True
            self._life.recompute_last(seq)
            self._life.unpause(seq)
        return ReadoutWait(list(seqs), self.readouts)

    def sample(self, seqs: list[Sequence], max_new_tokens: int, params: SamplingParams | None = None) -> Wait:
        """Each sequence samples until it has `max_new_tokens` more, or finishes (EOS, stop
        strings, max_tokens: its settings, `params` if given, else the request's)."""
        for seq in seqs:
            if params is not None:
                seq.params_override = params
            if seq.finish_reason is not None:
                continue
            seq.sample_budget = max_new_tokens
            self._life.recompute_last(seq)
            self._life.unpause(seq)
        return SampleWait(list(seqs))

    def score(self, token_lists: list[list[int]], adapter_id: int) -> Wait:
        """Reward-model scores (its score head at the last position) of each token list."""
        head = self._engine.adapters.by_id(adapter_id).weights.extra["score.weight"]
        seqs = [self.spawn(ids, adapter_id, (FINAL_NORM_TAP,)) for ids in token_lists]
        return ScoreWait(self, seqs, head) if seqs else _Done([])

    # ---- for the engine side ---------------------------------------------------------------
    def deliver(self, seq: Sequence, logits: torch.Tensor, taps: dict[int, torch.Tensor]) -> None:
        seq.wants_readout = False
        seq.paused = True
        self.readouts[seq.seq_id] = Readout(logits, taps)


class _Done(Wait):
    def __init__(self, value: Any) -> None:
        self.value = value

    def done(self) -> bool:
        return True

    def result(self) -> Any:
        return self.value


class SearchMethod(LogitMethod):
    """Base of the search methods: subclasses write `run(ctx)` and `report(request)`."""

    name = "search"

    def __init__(self) -> None:
        self.ctx: SearchContext | None = None
        self._driver: Generator[Wait, Any, None] | None = None
        self._wait: Wait | None = None
        self.error: str | None = None

    def run(self, ctx: SearchContext) -> Generator[Wait, Any, None]:
        raise NotImplementedError

    def attach(self, engine: "LLMEngine", seq: Sequence) -> None:
        self.ctx = SearchContext(engine, seq.request)
        self._driver = self.run(self.ctx)
        self._resume(None)

    @property
    def is_driving(self) -> bool:
        return self._driver is not None

    def adjust(self, seqs: list[Sequence], logits: torch.Tensor,
               taps: dict[int, dict[int, torch.Tensor]]) -> tuple[list[Sequence], torch.Tensor]:
        """Rows asked for go to the driver; rows with a sampling budget are sampled; the rest
        (a prefill nobody reads) are dropped."""
        ready: list[int] = []
        for row, seq in enumerate(seqs):
            if seq.wants_readout:
                self.ctx.deliver(seq, logits[row], taps.get(seq.seq_id, {}))
            elif seq.sample_budget > 0 and seq.role == "work" and not seq.paused:
                ready.append(row)
        return [seqs[r] for r in ready], logits[torch.tensor(ready, dtype=torch.long, device=logits.device)]

    def advance(self, request: "Request") -> list[SequenceDelta]:
        while self._driver is not None and self._wait is not None and self._wait.done():
            self._resume(self._wait.result())
        released, self.ctx.released = self.ctx.released, []
        return released

    def _resume(self, value: Any) -> None:
        try:
            self._wait = self._driver.send(value)  # send(None) starts it
        except StopIteration:
            self._end()
        except Exception as exc:  # a method's bug must end its request, not the engine thread
            logger.exception("search method %s failed", self.name)
            self.error = f"{type(exc).__name__}: {exc}"
            self._end()

    def _end(self) -> None:
        self._driver, self._wait = None, None
        for seq in list(self.ctx.request.aux):  # nothing a finished search made outlives it
            self.ctx.release(seq)
        for output in self.ctx.request.sequences:  # a driver that ends finishes what is left
            self.ctx.finish(output, output.finish_reason or "stop")

    def final_extra(self, request: "Request") -> dict[str, Any]:
        report = self.report(request)
        if self.error is not None:
            report = {**report, "error": self.error}
        return {"alignment": {self.name: report}}

    def detach(self, request: "Request") -> None:
        if self._driver is not None:
            self._driver.close()
        self._driver = self._wait = None
