"""Extractive answers: the span constraint against a brute-force reference (every step,
after rewinds), and greedy engine decoding under it against a float64 HF reference that
takes the argmax over the tokens the reference allows."""
from __future__ import annotations

import random

import pytest
import torch

from server.engine.sequence import Request, SamplingParams, Sequence
from server.methods.extractive import SpanConstraint
from tests.methods.conftest import chat_ids, run_requests, teacher_forced
from tests.methods.numerics import argmax_is_decided

END = 99


def reference_allowed(passages, can_start, prefix):
    """Tokens t for which prefix + [t] occurs contiguously in a passage, starting where a
    span may start; the end token once prefix is non-empty."""
    out = {END} if prefix else set()
    for ids, starts in zip(passages, can_start):
        for s in range(len(ids)):
            if not starts[s]:
                continue
            n = len(prefix)
            if ids[s:s + n] == prefix and s + n < len(ids):
                out.add(ids[s + n])
    return out or {END}


def make_seq(prompt, output):
    request = Request("r", list(prompt), SamplingParams())
    return Sequence(0, request, 0, list(prompt) + list(output), len(prompt))


def test_span_constraint_equals_brute_force():
    rng = random.Random(0)
    for trial in range(40):
        passages = [[rng.randrange(6) for _ in range(rng.randrange(1, 12))] for _ in range(rng.randrange(1, 4))]
        can_start = [[j == 0 or rng.random() < 0.6 for j in range(len(p))] for p in passages]
        c = SpanConstraint(passages, (END,), can_start)
        seq = make_seq([7, 8], [])
        prefix: list[int] = []
        for _ in range(14):
            got = set(c.allowed_tokens(seq))
            assert got == reference_allowed(passages, can_start, prefix), (trial, passages, can_start, prefix)
            token = rng.choice(sorted(got))
            if token == END:
                break
            prefix.append(token)
            seq.token_ids.append(token)
            if rng.random() < 0.2 and prefix:  # rewind: the cached state must not be trusted
                cut = rng.randrange(len(prefix))
                del prefix[cut:]
                del seq.token_ids[2 + cut:]


def test_no_end_token_is_refused():
    with pytest.raises(ValueError):
        SpanConstraint([[1, 2]], ())


def test_greedy_under_the_constraint_matches_float64_reference(engine, hf_model, lm_head_errors):
    tok = engine.tokenizer
    passages = ["Zorvath Kellin was born in Miruna in 1971 and works for Talvex Systems as a glassblower.",
                "Miruna is a small town on the river Osk; its mayor is Bela Trun."]
    seqs = [tok.encode(p) for p in passages]
    can_start = [[j == 0 or tok.token_str(t)[:1].isspace() for j, t in enumerate(ids)] for ids in seqs]
    ends = tuple(sorted(engine.eos_token_ids))
    questions = ["Where was Zorvath Kellin born? Answer with words from: " + " ".join(passages),
                 "Who is the mayor of Miruna? " + passages[1]]
    jobs = {f"q{i}": (chat_ids(engine, q), SamplingParams(temperature=0.0, max_tokens=24,
                                                        constraint=SpanConstraint(seqs, ends, can_start)), {})
            for i, q in enumerate(questions)}
    outs = run_requests(engine, jobs)
    decided = steps = 0
    for rid, (ids, _, _) in jobs.items():
        tokens = outs[rid]["tokens"][0]
        body = [t for t in tokens if t not in ends]
        assert body and any(s[i:i + len(body)] == body for s in seqs for i in range(len(s))), (rid, tokens)
        prefix: list[int] = []
        for i, (token, out) in enumerate(zip(tokens, teacher_forced(hf_model, ids, tokens))):
            allowed = reference_allowed(seqs, can_start, prefix)
            allowed = sorted((allowed - {END}) | (set(ends) if END in allowed else set()))
            assert token in allowed, (rid, i)
            scores = out.logits[0, -1][torch.tensor(allowed)]
            err = lm_head_errors(out.hidden_states[-1][0, -1], engine.model_config.num_layers + 1)
            if len(allowed) == 1 or argmax_is_decided(scores, err):
                decided += 1
                assert token == allowed[int(scores.argmax())], (rid, i)
            steps += 1
            prefix.append(token)
    assert decided >= steps // 2, (decided, steps)
