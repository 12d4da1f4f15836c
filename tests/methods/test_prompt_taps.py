"""Prompt-position taps: the last layer's FFN input at every prompt position (kNN-LM's keys)
equals transformers' input to `layers[-1].mlp` in float64, over chunked prefill and past a
prefix-cache hit that must not skip positions."""
from __future__ import annotations

import math

import torch

from server.engine.sequence import SamplingParams
from server.models.llama import LAST_FFN_INPUT_TAP
from tests.conftest import make_engine
from tests.methods.numerics import U32

TEXT = ("The river Velmor flows through Tarsk and Quill. Tarsk is known for its glass, and Quill for "
        "its bridges; both towns hold a market on the first day of spring.")


def hf_ffn_inputs(hf, ids: list[int]) -> torch.Tensor:
    seen = {}
    handle = hf.model.layers[-1].mlp.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            hf(torch.tensor([ids]))
    finally:
        handle.remove()
    return seen["x"][0]


def run(engine, rid: str, ids: list[int]) -> torch.Tensor:
    engine.add_request(rid, ids, SamplingParams(temperature=0.0, max_tokens=1, prompt_taps=(LAST_FFN_INPUT_TAP,)))
    got = None
    while engine.has_unfinished:
        for d in engine.step():
            if d.extra and "prompt_taps" in d.extra:
                got = d.extra["prompt_taps"][LAST_FFN_INPUT_TAP]
    return got


def test_ffn_input_taps_match_transformers(model_dir, hf_model):
    engine = make_engine(model_dir, max_num_batched_tokens=16)  # the prompt takes several chunks
    ids = engine.tokenizer.encode(TEXT)
    want = hf_ffn_inputs(hf_model, ids)
    config = engine.model_config
    # fp32 rounding after L layers (tests/methods/numerics.py): |dh| <= sqrt(L * d_ff) * u * |h|
    # for the residual stream; the RMSNorm divides by its rms and multiplies by the weight, so
    # the normalised row errs by that relative amount times the largest weight, twice for the
    # norm's own reduction and scaling.
    weight = float(hf_model.model.layers[-1].post_attention_layernorm.weight.detach().abs().max())
    rel = 2 * math.sqrt(config.num_layers * config.intermediate_size) * U32 * max(1.0, weight)
    for rid in ("first", "again"):  # the second run's prompt is in the prefix cache
        got = run(engine, rid, ids).double()
        assert got.shape == (len(ids), config.hidden_size)
        err = (got - want).norm(dim=-1)
        bound = rel * want.norm(dim=-1)
        print(rid, "worst error / bound", float((err / bound).max()))
        assert bool((err <= bound).all()), (rid, float((err / bound).max()))
