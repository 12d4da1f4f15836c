"""DoLa (Chuang et al. 2023): contrast the final layer's next-token distribution with an
early ("premature") layer's, chosen per token and per row by the largest divergence.

Follows the reference code (voidism/DoLa, HF `_dola_decoding`) where it departs from the
paper's prose, so published settings reproduce:
- layer j means HF's `hidden_states[j]` (0 = embedding output, j = after decoder layer j),
  projected by the LM head *without* the final norm unless `apply_final_norm`;
- the divergence is the references' `0.5 * (KL(M||q_N) + KL(M||q_j))`, averaged over the
  vocabulary (`F.kl_div(log q, M)` computes KL(M||q), not the textbook JSD's KL(q||M));
- the plausibility cut keeps tokens with q_N >= relative_top * max q_N (at least one).
Deliberate fix: the premature layer is chosen per row, not by a batch mean, so a row's
output never depends on what else is in the batch.

Prompt logprobs under DoLa (`adjust_prompt`, for scoring answers as the reference's `lm_score`
does): each prompt position gets the same contrast as a sampled one (its own premature layer,
the plausible head), and the engine's log-softmax turns it into the log-probability DoLa's
next-token distribution gives the prompt's token, i.e. the reference's `post_softmax` scoring.
Tokens outside the head score `PROMPT_FILTER_VALUE` (the reference's `relative_top_value`)
instead of -inf, so a summed answer score stays finite and comparable.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from server.engine.constraints import constrain
from server.methods.base import LogitMethod
from server.models.llama import EMBED_TAP

if TYPE_CHECKING:
    from server.engine.engine import LLMEngine
    from server.engine.sequence import Request, Sequence

BASE_FILTER_VALUE = -1e-3  # the HF port's fill for the premature scores outside the head
PROMPT_FILTER_VALUE = -1000.0  # the reference lm_score's relative_top_value: implausible prompt tokens
PROMPT_CHUNK = 32  # prompt positions contrasted at a time: [chunk, J, vocab] floats live at once


def candidate_layers(spec: str | list[int], num_layers: int, tie_word_embeddings: bool) -> list[int]:
    """HF's candidate premature layers: "low"/"high" buckets or an explicit list (< num_layers)."""
    if isinstance(spec, str):
        start = 0 if not tie_word_embeddings else (2 if num_layers > 2 else (1 if num_layers == 2 else 0))
        if spec == "low":
            if start == num_layers // 2:
                return [start]
            return list(range(start, num_layers // 2, 2)) if num_layers <= 40 else list(range(start, 20, 2))
        if spec == "high":
            if num_layers <= 40:
                return list(range(num_layers // 2, num_layers, 2))
            return list(range(num_layers - 20, num_layers, 2))
        raise ValueError(f"dola_layers must be 'low', 'high' or a list of layer indices, got {spec!r}")
    if any(not isinstance(j, int) or j < 0 for j in spec):
        raise ValueError("dola_layers indices must be non-negative integers")
    return [j for j in dict.fromkeys(spec) if j < num_layers]


def resolve_layers(spec: str | list[int], num_layers: int, tie_word_embeddings: bool) -> list[int]:
    """candidate_layers, refusing (ValueError) a spec that selects no layer."""
    layers = candidate_layers(spec, num_layers, tie_word_embeddings)
    if not layers:
        raise ValueError(f"dola_layers selects no layer below the final one ({num_layers})")
    return layers


def tap_for_layer(j: int) -> int:
    """Our tap key for HF hidden_states[j]."""
    return EMBED_TAP if j == 0 else j - 1


def reference_divergence(final_logits: torch.Tensor, premature_logits: torch.Tensor) -> torch.Tensor:
    """[rows, J] divergence between each row's final and J premature distributions."""
    final_p = final_logits.softmax(-1)[:, None, :]
    premature_p = premature_logits.softmax(-1)
    mean = 0.5 * (final_p + premature_p)
    kl_final = F.kl_div(final_logits.log_softmax(-1)[:, None, :].expand_as(mean), mean, reduction="none").mean(-1)
    kl_premature = F.kl_div(premature_logits.log_softmax(-1), mean, reduction="none").mean(-1)
    return 0.5 * (kl_final + kl_premature)


def contrast(final_logits: torch.Tensor, premature_logits: torch.Tensor, relative_top: float) -> torch.Tensor:
    """log q_N - log q_M inside the plausible head, -inf outside ([rows, vocab] each)."""
    final_lp = final_logits.log_softmax(-1)
    premature_lp = premature_logits.log_softmax(-1)
    if relative_top > 0.0:
        threshold = final_lp.max(-1, keepdim=True).values + math.log(relative_top)
        # At least one token stays plausible whatever relative_top is.
        threshold = torch.minimum(threshold, final_lp.max(-1, keepdim=True).values)
        outside = final_lp < threshold
        premature_lp = premature_lp.masked_fill(outside, BASE_FILTER_VALUE)
        final_lp = final_lp.masked_fill(outside, float("-inf"))
    return final_lp - premature_lp


def prompt_contrast(final_logits: torch.Tensor, premature_logits: torch.Tensor,
                    relative_top: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DoLa's scores at scored (prompt) positions and the index of the premature layer each used.

    Args:
        final_logits: [positions, vocab] the final layer's logits.
        premature_logits: [positions, J, vocab] the candidate layers' early-exit logits.
        relative_top: the plausibility cut (0 keeps every token).
    Returns:
        ([positions, vocab] contrast with PROMPT_FILTER_VALUE outside the head, [positions] layer index).
    """
    best = reference_divergence(final_logits, premature_logits).argmax(-1)
    chosen = premature_logits[torch.arange(len(best), device=best.device), best]
    scores = contrast(final_logits, chosen, relative_top)
    return scores.masked_fill(scores == float("-inf"), PROMPT_FILTER_VALUE), best


class DoLa(LogitMethod):
    name = "dola"

    def __init__(self, layers: str | list[int], relative_top: float = 0.1, apply_final_norm: bool = False) -> None:
        self.spec = layers
        self.relative_top = relative_top
        self.apply_final_norm = apply_final_norm
        self.layers: list[int] = []
        self.chosen: dict[int, list[int]] = {}  # output index -> premature layer per token

    def prepare(self, engine: "LLMEngine") -> None:
        from server.engine.engine import RequestError

        config = engine.model_config
        try:
            self.layers = resolve_layers(self.spec, config.num_layers, config.tie_word_embeddings)
        except ValueError as exc:
            raise RequestError(str(exc), "dola_layers") from exc
        self.tap_layers = tuple(tap_for_layer(j) for j in self.layers)
        self.model = engine.runner.model

    def adjust(self, seqs: list["Sequence"], logits: torch.Tensor,
               taps: dict[int, dict[int, torch.Tensor]]) -> tuple[list["Sequence"], torch.Tensor]:
        hidden = torch.stack([torch.stack([taps[s.seq_id][t] for t in self.tap_layers]) for s in seqs])
        hidden = hidden.to(self.model.dtype)
        if self.apply_final_norm:
            hidden = self.model.norm(hidden)
        premature = self.model.compute_logits(hidden)  # [rows, J, vocab]
        best = reference_divergence(logits, premature).argmax(-1)  # [rows]
        chosen = premature[torch.arange(len(seqs), device=logits.device), best]
        for seq, j in zip(seqs, best.tolist()):
            # The first row of an n > 1 request is about to be forked: its children sample
            # their first token from this same row.
            n = seq.request.params.n if not seq.is_forked else 1
            for index in range(seq.index, seq.index + n):
                self.chosen.setdefault(index, []).append(self.layers[j])
        # The plausible head is cut among the tokens a row's constraint allows (structured
        # output): cut from all, it may hold none of them. The divergence above sees them all.
        return seqs, contrast(constrain(logits, seqs, rules=False), chosen, self.relative_top)

    @torch.inference_mode()
    def adjust_prompt(self, seq: "Sequence", logits: torch.Tensor, taps: dict[int, torch.Tensor]) -> torch.Tensor:
        """Prompt positions' scores under DoLa (module docstring), PROMPT_CHUNK positions at a time."""
        out = []
        for a in range(0, len(logits), PROMPT_CHUNK):
            hidden = torch.stack([taps[t][a:a + PROMPT_CHUNK] for t in self.tap_layers], dim=1)  # [p, J, hidden]
            hidden = hidden.to(self.model.dtype)
            if self.apply_final_norm:
                hidden = self.model.norm(hidden)
            premature = self.model.compute_logits(hidden).float()  # [p, J, vocab]
            out.append(prompt_contrast(logits[a:a + PROMPT_CHUNK].float(), premature, self.relative_top)[0])
        return torch.cat(out)

    def report(self, request: "Request") -> dict[str, Any]:
        return {"candidate_layers": self.layers, "relative_top": self.relative_top,
                "apply_final_norm": self.apply_final_norm,
                "premature_layers": [self.chosen.get(i, []) for i in range(request.params.n)]}
