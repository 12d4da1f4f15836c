"""GenARM (Xu et al. 2025): guide the base model with an autoregressive reward model (ARM).

Each output sequence gets a shadow sequence under the ARM adapter, fed the same tokens
and batched with it (multi-LoRA); nothing is shared between their KV caches since the
ARM's LoRA changes K/V. When both rows of a position have logits the sampler sees

    scores = log_softmax(z_base) + alpha * log_softmax(z_arm)        (alpha = 1 / beta)

which samples from pi_base * pi_arm^alpha. The request's temperature, top-k/p and
penalties then apply to `scores` as they would to logits (no 1/(1+alpha) temperature
rescaling as in the reference scripts: alpha = 0 is plain sampling from the base).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from server.methods.base import LogitMethod

if TYPE_CHECKING:
    from server.engine.engine import LLMEngine
    from server.engine.sequence import Request, Sequence


class GenARM(LogitMethod):
    name = "genarm"
    streams_per_output = 2  # the output and its ARM shadow

    def __init__(self, reward_model: str, alpha: float = 1.0) -> None:
        self.reward_model = reward_model
        self.alpha = alpha
        self.arm_adapter_id = 0
        # output index -> {"base"|"arm": (num_tokens when computed, logits row)}
        self.pending: dict[int, dict[str, tuple[int, torch.Tensor]]] = {}
        self.num_steps = 0
        # output index -> {position: the base model's top token there} (for the report: where
        # guidance changed the pick); keyed by position so a recomputed step overwrites.
        self.base_top: dict[int, dict[int, int]] = {}
        self.token_str = str

    def prepare(self, engine: "LLMEngine") -> None:
        self.arm_adapter_id = engine.resolve_adapter(self.reward_model, param="genarm.reward_model")
        self.token_str = engine.tokenizer.token_str

    def attach(self, engine: "LLMEngine", seq: "Sequence") -> None:
        engine.add_shadow(seq, self.arm_adapter_id)

    def adjust(self, seqs: list["Sequence"], logits: torch.Tensor,
               taps: dict[int, dict[int, torch.Tensor]]) -> tuple[list["Sequence"], torch.Tensor]:
        ready: list["Sequence"] = []
        scores: list[torch.Tensor] = []
        for row, seq in enumerate(seqs):
            slot = self.pending.setdefault(seq.index, {})
            slot["arm" if seq.is_shadow else "base"] = (seq.num_tokens, logits[row])
            base, arm = slot.get("base"), slot.get("arm")
            # Both rows must describe the same position (a preempted twin recomputes first).
            if base is None or arm is None or base[0] != arm[0]:
                continue
            del self.pending[seq.index]
            ready.append(seq.request.sequences[seq.index])
            scores.append(base[1].log_softmax(-1) + self.alpha * arm[1].log_softmax(-1))
            self.base_top.setdefault(seq.index, {})[base[0]] = int(base[1].argmax())
            self.num_steps += 1
        if not ready:
            return [], logits[:0]
        return ready, torch.stack(scores)

    def report(self, request: "Request") -> dict[str, Any]:
        return {"reward_model": self.reward_model, "alpha": self.alpha,
                "guided_tokens": self.num_steps, "base_top": [self._base_top(s) for s in request.sequences]}

    def _base_top(self, seq: "Sequence") -> list[dict[str, Any]]:
        """Per output token: the base model's top token at that position and whether the
        guided pick differs from it (None: that position was not guided)."""
        tops = self.base_top.get(seq.index, {})
        out = []
        for pos in range(seq.num_prompt_tokens, len(seq.token_ids)):
            top = tops.get(pos)
            out.append({"token": self.token_str(top) if top is not None else None,
                        "differs": None if top is None else top != seq.token_ids[pos]})
        return out

    def detach(self, request: "Request") -> None:
        self.pending.clear()
