"""Helpers for token-exact comparisons under the near-tie rule (float math is not associative)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

NEAR_TIE = 1e-3


@dataclass
class Divergence:
    step: int
    gap: float  # top-1 minus top-2 logit in the reference at that step


def first_divergence(ours: list[int], ref: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            return i
    if len(ours) != len(ref):
        return min(len(ours), len(ref))
    return None


def check_near_tie_rule(results: list[tuple[list[int], list[int], list[float]]], max_diverging: int) -> list[Divergence]:
    """Each item: (ours, reference, reference top-2 gap per step).

    Every divergence must sit on a reference near-tie, and at most `max_diverging`
    sequences may diverge at all.
    """
    divergences = []
    for k, (ours, ref, gaps) in enumerate(results):
        step = first_divergence(ours, ref)
        if step is None:
            continue
        assert step < len(gaps), f"sequence {k}: lengths differ ({len(ours)} vs {len(ref)}) with no tie"
        assert gaps[step] < NEAR_TIE, (
            f"sequence {k} diverges at step {step} where the reference top-2 gap is {gaps[step]:.3g}:"
            f"\n ours={ours}\n ref ={ref}")
        divergences.append(Divergence(step, gaps[step]))
    assert len(divergences) <= max_diverging, f"{len(divergences)} sequences diverged: {divergences}"
    return divergences


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> tuple[list[int], list[float]]:
    """Reference greedy tokens from transformers `generate` and the top-2 logit gap at each step."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=eos_ids, pad_token_id=eos_ids[0], output_logits=True,
                                return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    gaps = [float(top.values[0] - top.values[1]) for top in (s[0].topk(2) for s in out.logits)]
    return tokens, gaps
