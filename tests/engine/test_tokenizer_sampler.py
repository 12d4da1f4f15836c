"""Detokenizer, stop strings and sampler math against independent references."""
from __future__ import annotations

import pytest
import torch

from server.engine.sampler import apply_penalties, sample
from server.engine.sequence import Request, SamplingParams, Sequence
from server.engine.tokenizer import (REPLACEMENT_CHAR, IncrementalDetokenizer, Tokenizer, find_stop,
                                     held_back_chars)


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer(model_dir)


@pytest.mark.parametrize("text", [
    "Plain ASCII text, with punctuation!",
    "Emoji 🎉🚀 and accents: café, naïve, Zürich",
    "中文字符和日本語のテキスト、한국어도",
    "  leading spaces\nnew lines\ttabs  ",
])
def test_incremental_detokenize_never_splits_characters(tokenizer, text):
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.hf.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(t) for t in ids]
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)


def test_multibyte_emoji_is_held_until_complete(tokenizer):
    ids = tokenizer.hf.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE splits the emoji, so partial decodes exist
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.add(t) for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🎉"


def test_stop_helpers():
    assert find_stop("hello world", ("wor",), 0) == 6
    assert find_stop("hello world", ("wor", "lo"), 0) == 3
    assert find_stop("abcXY", ("XY",), 4) == 3  # a stop that straddles the previous end
    assert find_stop("abc", ("zz",), 0) == -1
    assert held_back_chars("the end is ne", ("near",)) == 2
    assert held_back_chars("the end", ("near",)) == 0
    assert held_back_chars("abc<", ("<|stop|>", "x")) == 1


def make_seq(outputs: list[int], params: SamplingParams) -> Sequence:
    req = Request("r", [1, 2, 3], params)
    seq = Sequence(0, req, 0, [1, 2, 3] + outputs, 3)
    seq.generator = torch.Generator().manual_seed(0)
    return seq


def test_penalties_follow_openai_formula():
    vocab = 10
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    seq = make_seq([4, 4, 7], params)
    got = apply_penalties(logits.clone(), [seq])
    expected = logits.clone()
    for token, count in {4: 2, 7: 1}.items():
        expected[0, token] -= count * 0.25 + 0.5
    torch.testing.assert_close(got, expected)


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]])
    for seed in range(50):
        k_seq = make_seq([], SamplingParams(temperature=1.0, top_k=2))
        k_seq.generator = torch.Generator().manual_seed(seed)
        assert sample(logits.clone(), [k_seq])[0][0] in (0, 1)
        # probs ~ [.66, .24, .09, ...]: top_p 0.8 keeps the first two.
        p_seq = make_seq([], SamplingParams(temperature=1.0, top_p=0.8))
        p_seq.generator = torch.Generator().manual_seed(seed)
        assert sample(logits.clone(), [p_seq])[0][0] in (0, 1)


def test_sampling_frequencies_match_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    probs = torch.softmax(logits / 0.7, -1)[0]
    seq = make_seq([], SamplingParams(temperature=0.7))
    counts = torch.zeros(3)
    for _ in range(4000):
        counts[sample(logits.clone(), [seq])[0][0]] += 1
    torch.testing.assert_close(counts / 4000, probs, atol=0.03, rtol=0)


def test_logprobs_are_raw_model_logprobs():
    logits = torch.tensor([[2.0, 1.0, 0.5, -3.0]])
    seq = make_seq([], SamplingParams(temperature=0.0, logprobs=2))
    tokens, lps = sample(logits.clone(), [seq])
    ref = torch.log_softmax(logits[0], -1)
    assert tokens == [0] and abs(lps[0].logprob - ref[0].item()) < 1e-6
    assert [t for t, _ in lps[0].top] == [0, 1]
