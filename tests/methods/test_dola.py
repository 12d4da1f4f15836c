"""DoLa equals, step by step, an independent float64 reference on HF transformers' hidden states."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from server.engine.sequence import SamplingParams
from server.methods.dola import DoLa, candidate_layers
from tests.methods.conftest import chat_ids, run_requests, teacher_forced
from tests.methods.numerics import argmax_is_decided, logprob_mismatches

PROMPTS = ["What is the capital of France?", "Name three primary colors."]


@dataclass
class Step:
    """One position of the float64 reference, with the fp32 error bound of each logit vector."""

    final: torch.Tensor  # [vocab] final-layer logits
    premature: dict[int, torch.Tensor]  # layer -> [vocab] logits of that layer's hidden state
    err_final: float  # max |dz| the engine may be off by, final logits
    err: dict[int, float]  # the same per premature layer
    divergence: dict[int, float]
    div_err: dict[int, float]  # how far the engine's divergence may be off, per layer


def divergence(final: torch.Tensor, premature: torch.Tensor) -> tuple[float, float]:
    """The references' divergence, mean over the vocabulary of M*(log M - log p) etc., and its
    value summed over the vocabulary (which its error bound needs)."""
    log_p, log_q = final.log_softmax(-1), premature.log_softmax(-1)
    m = (log_p.exp() + log_q.exp()) / 2
    # xlogy: 0 log 0 = 0 (raw early-layer logits underflow some probabilities to 0).
    m_log_m = torch.special.xlogy(m, m)
    terms = 0.5 * ((m_log_m - m * log_p) + (m_log_m - m * log_q))
    return float(terms.mean()), float(terms.sum())


def divergence_error(total: float, eps: float, vocab: int) -> float:
    """Bound on the change of the mean divergence when every log-prob moves by <= eps.

    With p' = p e^a, q' = q e^b (|a|, |b| <= eps), M' = M e^c with |c| <= eps, and
    KL(M'||p') - KL(M||p) = sum M'(c - a) + sum (M' - M)(log M - log p), the first term is at
    most 2 eps and the second (e^eps - 1) * sum M |log M/p| <= (e^eps - 1)(KL(M||p) + 2 ln 2),
    as log M/p >= -ln 2. The fp32 sum of `vocab` terms adds log2(vocab) u, well below eps.
    """
    return (2 * eps + math.expm1(eps) * (total + 2 * math.log(2))) / vocab


def reference_step(hf, head_errors, out, layers: list[int], final_norm: bool) -> Step:
    """The DoLa quantities of the last position of a float64 HF forward pass `out`."""
    with torch.no_grad():
        num_layers = len(out.hidden_states) - 1
        final = out.logits[0, -1]
        # hidden_states[-1] is after the final norm, which adds one more reduction.
        err_final = head_errors(out.hidden_states[-1][0, -1], num_layers + 1)
        premature, err, div, div_err = {}, {}, {}, {}
        for j in layers:
            h = out.hidden_states[j][0, -1]  # after j layers (0: the embedding, exact)
            if final_norm:
                h = hf.model.norm(h)
            premature[j] = hf.lm_head(h)
            err[j] = head_errors(h, j + int(final_norm))
            div[j], total = divergence(final, premature[j])
            # Log-probs move by <= 2 max|dz| (see tests/methods/numerics.py).
            div_err[j] = divergence_error(total, 2 * max(err_final, err[j]), final.numel())
    return Step(final, premature, err_final, err, div, div_err)


def contrasts(step: Step, layer: int, relative_top: float):
    """(scores, error bound) for each plausible set the engine may have cut: tokens whose
    final log-prob lies within rounding of the relative_top threshold may fall either side."""
    lp_final, lp_base = step.final.log_softmax(-1), step.premature[layer].log_softmax(-1)
    # Against the max, logsumexp cancels: z_v - z_max is off by <= 2 err_final.
    margin = lp_final - (lp_final.max() + math.log(relative_top))
    sure = margin > 2 * step.err_final
    unsure = ((margin.abs() <= 2 * step.err_final)).nonzero().flatten().tolist()
    assert len(unsure) <= 3, f"{len(unsure)} tokens sit on the relative_top threshold"
    # Each log-prob in the contrast is off by <= 2 max|dz|.
    error = 2 * step.err_final + 2 * step.err[layer]
    for k in range(len(unsure) + 1):
        for extra in itertools.combinations(unsure, k):
            keep = sure.clone()
            keep[list(extra)] = True
            yield torch.where(keep, lp_final - lp_base, torch.full_like(lp_final, -math.inf)), error


@pytest.mark.parametrize("layers,relative_top,penalty,final_norm", [
    ("high", 0.1, 1.2, False),
    ([0, 4, 9, 14], 0.1, 1.0, False),
    ("low", 0.05, 1.2, True),
])
def test_dola_matches_reference_step_by_step(engine, hf_model, lm_head_errors, layers, relative_top, penalty,
                                             final_norm):
    config = engine.model_config
    candidates = candidate_layers(layers, config.num_layers, config.tie_word_embeddings)
    params = SamplingParams(temperature=0.0, max_tokens=20, logprobs=5, repetition_penalty=penalty)
    jobs = {f"dola{i}": (chat_ids(engine, text), params,
                         {"method": DoLa(layers, relative_top, final_norm)}) for i, text in enumerate(PROMPTS)}
    outs = run_requests(engine, jobs)
    num_steps = num_layer_decided = num_token_decided = 0
    for rid, (ids, _, _) in jobs.items():
        tokens, logprobs = outs[rid]["tokens"][0], outs[rid]["logprobs"][0]
        chosen = outs[rid]["alignment"]["dola"]["premature_layers"][0]
        assert outs[rid]["alignment"]["dola"]["candidate_layers"] == candidates
        assert len(chosen) == len(tokens) == len(logprobs)
        prefix = list(ids)
        for i, (token, out) in enumerate(zip(tokens, teacher_forced(hf_model, ids, tokens))):
            where = f"{rid} step {i}"
            step = reference_step(hf_model, lm_head_errors, out, candidates, final_norm)
            best, ours = max(candidates, key=step.divergence.get), chosen[i]
            # Ours may pick another layer only where rounding could reorder the two.
            assert step.divergence[best] - step.divergence[ours] <= step.div_err[best] + step.div_err[ours], (
                f"{where}: premature layer {ours} != {best}", step.divergence)
            num_layer_decided += all(step.divergence[best] - step.divergence[j] > step.div_err[best] + step.div_err[j]
                                     for j in candidates if j != best)
            # Our reported logprobs are log_softmax of the contrast, before penalties.
            reported = logprobs[i].top + [(token, logprobs[i].logprob)]
            for scores, error in contrasts(step, ours, relative_top):
                if not logprob_mismatches(reported, scores.log_softmax(-1), 2 * error):
                    break
            else:
                ref = next(contrasts(step, ours, relative_top))[0].log_softmax(-1)
                raise AssertionError((where, logprob_mismatches(reported, ref, 2 * error)))
            penalized = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prefix]), scores[None].clone())[0]
            if argmax_is_decided(penalized, penalty * error):
                num_token_decided += 1
                assert token == int(penalized.argmax()), where
            num_steps += 1
            prefix.append(token)
    # Rounding leaves the choice open at a few steps at most, else this test could not fail.
    assert num_layer_decided >= num_steps // 2 and num_token_decided >= num_steps // 2, (
        num_steps, num_layer_decided, num_token_decided)


def test_dola_row_does_not_depend_on_its_batch(engine):
    ids = chat_ids(engine, PROMPTS[0])
    params = SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=1.2)
    alone = run_requests(engine, {"alone": (ids, params, {"method": DoLa("high")})})["alone"]
    mixed = run_requests(engine, {
        "plain": (chat_ids(engine, "Tell me a joke."), SamplingParams(temperature=0.0, max_tokens=16), {}),
        "low": (chat_ids(engine, PROMPTS[1]), params, {"method": DoLa("low")}),
        "target": (ids, params, {"method": DoLa("high")}),
    })["target"]
    assert mixed["tokens"] == alone["tokens"]
    assert mixed["alignment"] == alone["alignment"]
    assert engine.kv.pool.num_used_blocks == 0


def test_dola_with_n_samples_reports_every_choice(engine):
    ids = chat_ids(engine, PROMPTS[1])
    params = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=8)
    out = run_requests(engine, {"n3": (ids, params, {"method": DoLa("high")})})["n3"]
    chosen = out["alignment"]["dola"]["premature_layers"]
    assert [len(c) for c in chosen] == [len(out["tokens"][i]) for i in range(3)]
    assert engine.kv.pool.num_used_blocks == 0 and not engine.requests and not engine.seqs


def test_dola_layer_rules_follow_transformers():
    # SmolLM2-135M: 30 layers, tied embeddings (HF starts at layer 2 then).
    assert candidate_layers("low", 30, True) == list(range(2, 15, 2))
    assert candidate_layers("high", 30, True) == list(range(15, 30, 2))
    assert candidate_layers("low", 30, False)[0] == 0
    assert candidate_layers("high", 48, False) == list(range(28, 48, 2))
    assert candidate_layers([3, 30, 3, 40], 30, True) == [3]
    with pytest.raises(ValueError):
        candidate_layers("middle", 30, True)
