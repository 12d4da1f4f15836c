"""The contract between the engine and a per-step test-time method (DoLa, GenARM, ...).

A `LogitMethod` instance belongs to one request. The engine calls `prepare` before the
request exists (validate, resolve adapters; raising refuses the request), `attach` once
its first sequence exists (e.g. add shadow sequences), `adjust` every step with the rows
of its sequences that produced logits, `report` when the request finishes (the
response's `alignment` object) and `detach` when it is forgotten (finished or aborted).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

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

    def report(self, request: "Request") -> dict[str, Any]:
        """What ran, for the response's `alignment[name]` object."""
        return {}

    def detach(self, request: "Request") -> None:
        """Drop per-request state (the request finished or was aborted)."""
