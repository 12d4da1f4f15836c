"""Contracts between engine stages: scheduler -> runner -> engine -> async front.

`SchedulerOutput` is the only thing the runner reads about scheduling decisions;
`ModelOutput` is what the runner hands back; `SequenceDelta` is what a step emits
for the API side (plain Python, no tensors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ScheduledSequence:
    """One sequence's share of a step: `num_new_tokens` tokens starting at `start`."""

    seq_id: int
    token_ids: list[int]  # the new tokens to feed
    start: int  # position of token_ids[0] == num_computed_tokens before the step
    block_table: list[int]
    adapter_id: int
    needs_logits: bool  # this chunk reaches the end of the sequence
    tap_layers: tuple[int, ...] = ()
    prompt_taps: tuple[int, ...] = ()  # taps wanted at every prompt position of this chunk
    num_prompt_tokens: int = 0

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    """What to run this step."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) copy-on-write
    preempted_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class ModelOutput:
    """Runner output: logits for rows that asked, hidden-state taps for rows that asked."""

    logits: torch.Tensor  # [num_logit_rows, vocab] float32, one row per needs_logits seq
    logit_seq_ids: list[int]
    taps: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)  # seq_id -> layer -> [hidden]
    # seq_id -> (first position, tap -> [prompt positions in this chunk, hidden]), for
    # sequences with prompt_taps
    prompt_taps: dict[int, tuple[int, dict[int, torch.Tensor]]] = field(default_factory=dict)


@dataclass
class TokenLogprob:
    """Log-probability of a sampled token and its top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int | None = None  # 1 + tokens likelier than it (prompt logprobs report it, as vLLM)


@dataclass
class SequenceDelta:
    """What one sequence produced in one step, for the API side."""

    request_id: str
    index: int
    new_token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    request_finished: bool = False
    extra: dict[str, Any] | None = None
