"""Per-request and per-sequence state: sampling parameters, token ids, KV bookkeeping.

A request owns one or more sequences (n > 1 forks after prefill). The scheduler and the
KV manager mutate `Sequence` fields; nothing here touches tensors.
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    PARKED = "parked"  # paused with no blocks, in no queue (server/engine/lifecycle.py)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop, validated by the API layer."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: whole vocabulary
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # HF/vLLM multiplicative penalty over prompt + output tokens
    logprobs: int | None = None  # None: none; k >= 0: chosen token + top-k alternatives
    skip_special_tokens: bool = True
    min_p: float = 0.0  # drop tokens less likely than min_p x the top token (after temperature)
    min_tokens: int = 0  # no EOS, stop token or stop string before this many output tokens
    # Which tokens may come next (server/engine/constraints.py): extractive RAG's spans, a grammar.
    constraint: Any = None
    # Additive per-token scores (server/engine/logit_rules.py): logit_bias, min_tokens, bad_words.
    logit_rules: tuple[Any, ...] = ()
    # Hidden states (tap keys, server/models/llama.py) returned at every prompt position, e.g.
    # kNN-LM datastore keys; such a prompt is computed in full (no prefix-cache hits).
    prompt_taps: tuple[int, ...] = ()
    prompt_logprobs: int | None = None  # k >= 0: each prompt token's logprob + top-k (first: None)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class Request:
    """One API request as the engine sees it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: int = 0  # 0: base model
    arrival_time: float = 0.0
    sequences: list["Sequence"] = field(default_factory=list)  # the outputs, by index
    aux: list["Sequence"] = field(default_factory=list)  # work sequences and shadows
    num_finished: int = 0
    method: Any = None  # server.methods.base.LogitMethod / SearchMethod driving this request
    num_spawned: int = 0  # work sequences made so far (their seeds derive from it)
    num_generated: int = 0  # tokens sampled for this request, by any of its sequences
    tap_layers: tuple[int, ...] = ()  # hidden states every output of the request returns


_seq_counter = itertools.count()


def next_seq_id() -> int:
    """Engine-wide unique sequence id (ids are never reused, so stale references fail loudly)."""
    return next(_seq_counter)


@dataclass
class Sequence:
    """One token stream with its paged KV state.

    NOTE: `num_computed_tokens` counts tokens whose K/V are in the cache; the scheduler
    moves it toward `num_tokens` (chunked prefill, decode, recompute after preemption and
    rewinds are all the same loop).
    """

    seq_id: int
    request: Request
    index: int  # position among the request's n outputs
    token_ids: list[int]
    num_prompt_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks
    num_cached_blocks: int = 0  # leading blocks registered in the prefix cache
    finish_reason: str | None = None
    seed: int = 0  # sampling seed (lifecycle.seed_for); a draw's noise is keyed by (seed, num_draws)
    num_draws: int = 0  # random draws made so far (server/engine/draws.py)
    tap_layers: tuple[int, ...] = ()  # layers whose hidden states this row asks for
    detok: Any = None  # tokenizer.IncrementalDetokenizer, owned by the engine
    output_text: str = ""
    num_sent_chars: int = 0  # characters of output_text already streamed
    logprobs: list[Any] = field(default_factory=list)
    is_forked: bool = False  # n > 1 children already created
    holds_adapter: bool = False  # pins its adapter's device slot while running
    adapter_override: int | None = None  # an auxiliary sequence's own adapter (GenARM's ARM, an RM)
    shadow: "Sequence | None" = None  # lockstep twin fed the same tokens (not an output)
    # "output": streamed to the client; "shadow": a lockstep twin; "work": a search method's
    # branch, evaluation or scoring pass (its text is held, never streamed: a method commits
    # it into an output). See server/engine/lifecycle.py.
    role: str = "output"
    params_override: SamplingParams | None = None  # a work sequence's own sampling settings
    paused: bool = False  # a work sequence waiting for its method: never scheduled
    sample_budget: int = 0  # work sequences: tokens left to sample before pausing
    wants_readout: bool = False  # work sequences: hand the next logits row to the method
    last_scheduled_step: int = -1  # the scheduler's step count when this last had a row
    prompt_tap_rows: dict[int, list[Any]] = field(default_factory=dict)  # tap -> [chunk rows], prompt order

    @property
    def is_shadow(self) -> bool:
        return self.role == "shadow"

    @property
    def params(self) -> SamplingParams:
        return self.params_override or self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def adapter_id(self) -> int:
        return self.request.adapter_id if self.adapter_override is None else self.adapter_override

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
