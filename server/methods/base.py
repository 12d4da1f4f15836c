"""The contract between the engine and a per-step test-time method (DoLa, GenARM, ...).

A `LogitMethod` instance belongs to one request. The engine calls `prepare` before the
request exists (validate, resolve adapters; raising refuses the request), `attach` once
its first sequence exists (e.g. add shadow sequences), `adjust` every step with the rows
of its sequences that produced logits, `advance` after every step (a search method's
driver moves on there; server/methods/search.py), `final_extra` for the last delta (by
default `{"alignment": {name: report}}`) and `detach` when it is forgotten (finished or
aborted).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from server.engine.messages import SequenceDelta

if TYPE_CHECKING:
    from server.engine.engine import LLMEngine
    from server.engine.sequence import Request, Sequence


class LogitMethod:
    """Rewrites a request's next-token scores before the sampler sees them."""

    name = "method"
    tap_layers: tuple[int, ...] = ()  # hidden states the method reads at each sampled position
    streams_per_output = 1  # sequences (KV streams) each output needs: 2 with a shadow

    def prepare(self, engine: "LLMEngine") -> None:
        """Validate against the engine (adapters, layer counts); raise RequestError to refuse."""

    def attach(self, engine: "LLMEngine", seq: "Sequence") -> None:
        """Called once the request's first sequence is queued."""

    def adjust(self, seqs: list["Sequence"], logits: torch.Tensor,
               taps: dict[int, dict[int, torch.Tensor]]) -> tuple[list["Sequence"], torch.Tensor]:
        """Given the rows (`seqs`, float32 `logits` [rows, vocab]) of this request that have
        logits this step, return the output sequences to sample now and their scores. The
        scores are treated as logits: penalties, temperature, top-k/p and logprobs apply to
        them. Rows may be held back (returned later) or consumed (shadows)."""
        raise NotImplementedError

    def adjust_prompt(self, seq: "Sequence", logits: torch.Tensor, taps: dict[int, torch.Tensor]) -> torch.Tensor:
        """Scores at prompt positions (`logits` [positions, vocab], `taps` tap -> [positions,
        hidden]) for prompt logprobs; by default the base model's."""
        return logits

    @classmethod
    def adjust_batch(cls, items: list[tuple["LogitMethod", list["Sequence"], torch.Tensor]],
                     taps: dict[int, dict[int, torch.Tensor]]) -> list[tuple[list["Sequence"], torch.Tensor]]:
        """`adjust` for every request of this class in the step, `(method, rows, logits)` each;
        override to share work across requests (one search for all of them)."""
        return [method.adjust(seqs, logits, taps) for method, seqs, logits in items]

    def advance(self, request: "Request") -> list[SequenceDelta]:
        """Called after every engine step; returns deltas the method released (commits)."""
        return []

    @property
    def is_driving(self) -> bool:
        """True while the method has work of its own to do (keeps the engine stepping)."""
        return False

    def report(self, request: "Request") -> dict[str, Any]:
        """What ran, for the response's `alignment[name]` object."""
        return {}

    def final_extra(self, request: "Request") -> dict[str, Any]:
        """Extra fields of the request's last delta."""
        return {"alignment": {self.name: self.report(request)}}

    def detach(self, request: "Request") -> None:
        """Drop per-request state (the request finished or was aborted)."""
