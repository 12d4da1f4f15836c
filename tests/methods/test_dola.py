"""DoLa equals, step by step, an independent reference on HF transformers' hidden states."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from server.engine.sequence import SamplingParams
from server.methods.dola import DoLa, candidate_layers
from tests.engine.oracle import NEAR_TIE
from tests.methods.conftest import chat_ids, run_requests

PROMPTS = ["What is the capital of France?", "Name three primary colors."]


def reference_step(hf, ids: list[int], layers: list[int], relative_top: float, penalty: float,
                   final_norm: bool) -> tuple[torch.Tensor, int, float]:
    """Contrast scores (before penalty), penalized argmax's layer, and the divergence gap,
    from a full HF forward pass in float64 after the forward."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
        final = out.logits[0, -1].double()
        divergences = []
        premature = {}
        for j in layers:
            h = out.hidden_states[j][0, -1]
            if final_norm:
                h = hf.model.norm(h)
            premature[j] = hf.lm_head(h).double()
            log_p, log_q = final.log_softmax(-1), premature[j].log_softmax(-1)
            m = (log_p.exp() + log_q.exp()) / 2
            # The references' divergence: mean over the vocabulary of M*(log M - log p), etc.
            # (xlogy: 0 log 0 = 0; raw early-layer logits underflow some probabilities to 0.)
            m_log_m = torch.special.xlogy(m, m)
            divergences.append(0.5 * ((m_log_m - m * log_p).mean() + (m_log_m - m * log_q).mean()))
    div = torch.stack(divergences)
    best = int(div.argmax())
    top2 = div.topk(min(2, len(layers))).values
    gap = float(top2[0] - top2[-1]) if len(layers) > 1 else math.inf
    lp_final, lp_base = final.log_softmax(-1), premature[layers[best]].log_softmax(-1)
    keep = lp_final >= lp_final.max() + (math.log(relative_top) if relative_top > 0 else -math.inf)
    scores = torch.where(keep, lp_final - lp_base, torch.full_like(lp_final, -math.inf))
    return scores, layers[best], gap


@pytest.mark.parametrize("layers,relative_top,penalty,final_norm", [
    ("high", 0.1, 1.2, False),
    ([0, 4, 9, 14], 0.1, 1.0, False),
    ("low", 0.05, 1.2, True),
])
def test_dola_matches_reference_step_by_step(engine, hf_model, layers, relative_top, penalty, final_norm):
    config = engine.model_config
    candidates = candidate_layers(layers, config.num_layers, config.tie_word_embeddings)
    params = SamplingParams(temperature=0.0, max_tokens=20, logprobs=5, repetition_penalty=penalty)
    jobs = {f"dola{i}": (chat_ids(engine, text), params,
                         {"method": DoLa(layers, relative_top, final_norm)}) for i, text in enumerate(PROMPTS)}
    outs = run_requests(engine, jobs)
    for rid, (ids, _, _) in jobs.items():
        tokens, logprobs = outs[rid]["tokens"][0], outs[rid]["logprobs"][0]
        chosen = outs[rid]["alignment"]["dola"]["premature_layers"][0]
        assert outs[rid]["alignment"]["dola"]["candidate_layers"] == candidates
        assert len(chosen) == len(tokens) == len(logprobs)
        prefix = list(ids)
        for step, token in enumerate(tokens):
            scores, layer, layer_gap = reference_step(hf_model, prefix, candidates, relative_top, penalty, final_norm)
            if layer_gap > 1e-6:
                assert chosen[step] == layer, f"{rid} step {step}: premature layer {chosen[step]} != {layer}"
            if chosen[step] == layer:
                # Our reported logprobs are log_softmax of the contrast, before penalties.
                ref_lp = scores.log_softmax(-1).clamp(min=-9999.0)
                ours = dict(logprobs[step].top)
                for tok, value in ours.items():
                    assert abs(value - float(ref_lp[tok])) < 1e-4 + 1e-5 * abs(value), (rid, step, tok, value)
                penalized = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prefix]), scores[None].clone())[0]
                top2 = penalized.topk(2).values
                if float(top2[0] - top2[1]) > NEAR_TIE:
                    assert token == int(penalized.argmax()), f"{rid} step {step}"
            prefix.append(token)


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
