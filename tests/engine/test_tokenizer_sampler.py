"""Detokenizer, stop strings and sampler math against independent references: a per-row
float64 sampler with the counter-based noise recomputed in numpy, and full decodes."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from server.engine.draws import draw_key, race_noise
from server.engine.sampler import WINDOWS, apply_penalties, sample
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
    return Sequence(0, req, 0, [1, 2, 3] + outputs, 3, seed=0)


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
        k_seq.seed = seed
        assert sample(logits.clone(), [k_seq])[0][0] in (0, 1)
        # probs ~ [.66, .24, .09, ...]: top_p 0.8 keeps the first two.
        p_seq = make_seq([], SamplingParams(temperature=1.0, top_p=0.8))
        p_seq.seed = seed
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


# ---- the counter-based noise, recomputed in numpy ------------------------------------------
U64, U32 = np.uint64, np.uint32


def ref_mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
    return z ^ (z >> U64(31))


def ref_key(seed: int, draw: int) -> int:
    with np.errstate(over="ignore"):
        state = ref_mix64(np.array([seed], dtype=U64)) + U64(draw + 1) * U64(0x9E3779B97F4A7C15)
        return int(ref_mix64(state)[0])


def ref_low32(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> U32(16))) * U32(0x7FEB352D)
    z = (z ^ (z >> U32(15))) * U32(0x846CA68B)
    return z ^ (z >> U32(16))


def ref_noise(key: int, vocab_ids: np.ndarray) -> np.ndarray:
    """float64 Exp(1) noise of one draw at these vocabulary ids."""
    with np.errstate(over="ignore"):
        z = vocab_ids.astype(U32) * U32(0x9E3779B9) + U32(key & 0xFFFFFFFF)
        h = ref_low32(ref_low32(z) ^ U32(key >> 32))
    return -np.log(((h >> U32(9)).astype(np.float64) + 0.5) / 2.0 ** 23)


def test_noise_is_splitmix64_keys_and_lowbias32_bits():
    with np.errstate(over="ignore"):  # SplitMix64 seeded with 0: its first output, a published vector
        assert int(ref_mix64(np.array([0x9E3779B97F4A7C15], dtype=U64))[0]) == 0xE220A8397B1DCDAF
    keys = [draw_key(seed, draw) for seed in (0, 1, 2**62 + 12345) for draw in (0, 1, 977)]
    assert keys == [ref_key(seed, draw) for seed in (0, 1, 2**62 + 12345) for draw in (0, 1, 977)]
    assert len(set(keys)) == len(keys)
    ids = np.arange(49152)
    got = race_noise(keys, torch.arange(49152))
    expected = np.stack([ref_noise(k, ids) for k in keys])
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=2e-6, atol=0)
    window = torch.tensor([[7, 49151, 3], [0, 1, 2]])
    np.testing.assert_allclose(race_noise(keys[:2], window).double().numpy(),
                               np.stack([ref_noise(k, w.numpy()) for k, w in zip(keys, window)]), rtol=2e-6)
    assert got.min() > 0 and abs(float(got.mean()) - 1.0) < 0.01  # Exp(1): mean 1


# ---- the batched sampler against a per-row float64 reference -------------------------------
def reference_row(logits: torch.Tensor, seq: Sequence, draw: int) -> tuple[int, torch.Tensor, float, list[int]]:
    """(token, race scores, raw logprob of the token, raw top ids) for one row, in float64, as
    the documented semantics say, looping over tokens."""
    p, vocab = seq.params, logits.shape[0]
    raw = torch.log_softmax(logits.double(), -1).clamp(min=-9999.0)
    x = logits.double().clone()
    if p.repetition_penalty != 1.0:
        for t in set(seq.token_ids):
            x[t] = x[t] * p.repetition_penalty if x[t] < 0 else x[t] / p.repetition_penalty
    for t, count in Counter(seq.output_token_ids).items():
        x[t] -= p.frequency_penalty * count + p.presence_penalty
    if p.is_greedy:
        token = int(torch.argmax(x))
        scores = torch.zeros(vocab, dtype=torch.float64)
        scores[token] = 1.0
    else:
        x = x / p.temperature
        if 0 < p.top_k < vocab:
            kth = torch.sort(x, descending=True).values[p.top_k - 1]
            x[x < kth] = float("-inf")
        if p.top_p < 1.0:
            order = torch.sort(x, descending=True).indices.tolist()
            probs = torch.softmax(x, -1)
            mass = 0.0
            probs = probs.tolist()
            for t in order:
                if mass >= p.top_p:
                    x[t] = float("-inf")
                mass += probs[t]
        noise = torch.from_numpy(ref_noise(ref_key(seq.seed, draw), np.arange(vocab)))
        scores = torch.softmax(x, -1) / noise
        token = int(torch.argmax(scores))
    k = p.logprobs or 0
    return token, scores, float(raw[token]), torch.topk(raw, k).indices.tolist() if k else []


def check_against_reference(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    draws = [s.num_draws for s in seqs]
    tokens, logprobs = sample(logits, seqs)
    for row, seq in enumerate(seqs):
        token, scores, raw_lp, top = reference_row(logits[row], seq, draws[row])
        # float32 vs float64: another token may win only on a near tie of the race scores.
        assert tokens[row] == token or scores[tokens[row]] >= (1 - 1e-5) * scores[token], (row, tokens[row], token)
        assert seq.num_draws == draws[row] + (not seq.params.is_greedy)
        if seq.params.logprobs is None:
            assert logprobs[row] is None
        else:
            assert abs(logprobs[row].logprob - raw_lp) < 1e-4 and [t for t, _ in logprobs[row].top] == top
    return tokens


def rows_for_every_path(vocab: int) -> tuple[torch.Tensor, list[Sequence]]:
    """Logits and sequences covering greedy, penalties, plain temperature, top-k (ties at the
    k-th value, k past the first window), and top-p nuclei inside each window and past them."""
    gen = torch.Generator().manual_seed(0)
    specs = [
        (8.0, SamplingParams(temperature=0.0, logprobs=3)),
        (3.0, SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.6)),
        (3.0, SamplingParams(temperature=0.7, seed=1)),
        (3.0, SamplingParams(temperature=1.3, top_k=7, seed=2, logprobs=0)),
        (None, SamplingParams(temperature=1.0, top_k=100, seed=3)),  # quantized: ties at the k-th value
        (6.0, SamplingParams(temperature=0.8, top_p=0.9, seed=4)),  # nucleus inside the first window
        (1.2, SamplingParams(temperature=0.9, top_p=0.5, seed=5)),  # needs the second window
        (0.3, SamplingParams(temperature=1.0, top_p=0.95, seed=6, logprobs=2)),  # needs a full sort
        (2.0, SamplingParams(temperature=0.8, top_k=40, top_p=0.8, seed=7, repetition_penalty=0.8,
                             frequency_penalty=-0.5)),
        (4.0, SamplingParams(temperature=0.0, top_k=1, presence_penalty=2.0)),
    ]
    rows, seqs = [], []
    for i, (scale, params) in enumerate(specs):
        row = torch.randn(vocab, generator=gen)
        row = (row * 4).round() / 2 if scale is None else row * scale
        history = torch.randint(0, vocab, (30,), generator=gen).tolist()
        history[:5] = [int(row.argmax())] * 5  # penalties must be able to change the argmax
        req = Request(f"r{i}", history[:20], params)
        seqs.append(Sequence(i, req, 0, history, 20, seed=1000 + i))
        rows.append(row)
    logits = torch.stack(rows)
    logits[0, :vocab // 2] = float("-inf")  # a method's mask: logprobs clamp at -9999
    return logits, seqs


def nucleus_size(row: torch.Tensor, top_p: float) -> int:
    probs = torch.sort(torch.softmax(row.double(), -1), descending=True).values
    return int(((probs.cumsum(-1) - probs) < top_p).sum())


def test_batched_sampler_equals_per_row_float64_reference():
    vocab = 4096
    logits, seqs = rows_for_every_path(vocab)
    sizes = [nucleus_size(logits[r] / seqs[r].params.temperature, seqs[r].params.top_p) for r in (5, 6, 7)]
    assert sizes[0] < WINDOWS[0] < sizes[1] < WINDOWS[1] < sizes[2], sizes
    row = logits[4] / seqs[4].params.temperature
    assert (row == torch.sort(row, descending=True).values[99]).sum() > 1  # ties at the k-th value
    before = logits.clone()
    picked = [check_against_reference(logits, seqs) for _ in range(6)]  # six draws per row
    assert torch.equal(logits, before)  # the input is not modified
    assert all(len({p[r] for p in picked}) > 1 for r in (2, 7))  # successive draws differ


def test_masked_logprobs_clamp_to_vllm_floor():
    logits = torch.tensor([[2.0, 1.0, float("-inf"), float("-inf")]])
    tokens, lps = sample(logits, [make_seq([], SamplingParams(temperature=0.0, logprobs=3))])
    assert tokens == [0] and lps[0].top[2][1] == -9999.0 and lps[0].top[2][0] in (2, 3)


def test_penalties_match_reference_for_every_row():
    logits, seqs = rows_for_every_path(512)
    got = apply_penalties(logits.clone(), seqs)
    for row, seq in enumerate(seqs):
        p, ref = seq.params, logits[row].double().clone()
        for t in set(seq.token_ids):
            if p.repetition_penalty != 1.0:
                ref[t] = ref[t] * p.repetition_penalty if ref[t] < 0 else ref[t] / p.repetition_penalty
        for t, count in Counter(seq.output_token_ids).items():
            ref[t] -= p.frequency_penalty * count + p.presence_penalty
        torch.testing.assert_close(got[row].double(), ref, atol=1e-5, rtol=1e-6)
    assert not torch.equal(got[1], logits[1]) and torch.equal(got[0], logits[0])


def test_seeded_row_is_batch_invariant():
    """A row samples the same token alone as in any batch of greedy, seeded, penalized rows."""
    vocab = 4096
    logits, seqs = rows_for_every_path(vocab)
    for row in (2, 3, 4, 6, 7, 8):
        mixed, alone = rows_for_every_path(vocab)[1], rows_for_every_path(vocab)[1]
        order = list(range(len(mixed)))
        random.Random(row).shuffle(order)
        for _ in range(3):
            batch_tokens, batch_lps = sample(logits[order], [mixed[r] for r in order])
            token, lp = sample(logits[row:row + 1], [alone[row]])
            assert batch_tokens[order.index(row)] == token[0]
            if lp[0] is not None:
                assert batch_lps[order.index(row)] == lp[0]


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (-1, 0.8)])
def test_filtered_frequencies_match_renormalized_softmax(top_k, top_p):
    # probs at T=1: ~[.66, .24, .09, ...]: top-k 3 keeps three, top-p 0.8 the first two (the
    # second crosses 0.8, and a token stays while the mass before it is < top_p).
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]])
    kept = 3 if top_k == 3 else 2
    probs = torch.softmax(logits[0, :kept], -1)
    seq = make_seq([], SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p))
    counts = torch.zeros(5)
    for _ in range(4000):
        counts[sample(logits.clone(), [seq])[0][0]] += 1
    assert counts[kept:].sum() == 0
    torch.testing.assert_close(counts[:kept] / 4000, probs, atol=0.03, rtol=0)


def test_many_seeded_rows_equal_reference():
    """300 rows of random top-k / top-p / temperature settings and logit scales, one batch: the
    kept set's boundary tokens are drawn often enough that any off-by-one shows."""
    rng = random.Random(0)
    vocab = 512
    gen = torch.Generator().manual_seed(1)
    seqs, rows = [], []
    for i in range(300):
        params = SamplingParams(temperature=rng.choice([0.5, 1.0, 1.5]), top_k=rng.choice([-1, 2, 10, 70]),
                                top_p=rng.choice([1.0, 0.3, 0.7, 0.95]), seed=i)
        seqs.append(Sequence(i, Request(f"r{i}", [1], params), 0, [1], 1, seed=i))
        rows.append(torch.randn(vocab, generator=gen) * rng.choice([0.5, 2.0, 5.0]))
    check_against_reference(torch.stack(rows), seqs)


# ---- DecodeStream detokenizing against full decodes ------------------------------------------
FRAGMENTS = ["the", " cat", " sat", ",", ".", " ", "  ", "\n", "\t", "🎉", "🚀", "👩‍💻", " café", " naïve", "中文",
             "日本語", "한국어", " Zürich", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "1234", " (x)", "'s"]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_detokenizer_equals_full_decode_on_random_text(tokenizer, skip_special_tokens):
    rng = random.Random(skip_special_tokens)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Say something."}])
    for trial in range(60):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 30)))
        ids = tokenizer.hf.encode(text, add_special_tokens=False)
        prompt = chat if trial % 3 else tokenizer.encode("Say:" + rng.choice(FRAGMENTS))
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
        assert detok._stream is not None  # the Rust path is the one under test
        deltas = [detok.add(t) for t in ids]
        assert all(REPLACEMENT_CHAR not in d for d in deltas)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens), text


def test_stream_detokenizer_moves_like_the_python_one_on_random_ids(tokenizer):
    """Arbitrary ids (lone UTF-8 bytes, specials): same deltas and offsets as the Python path."""
    rng = random.Random(0)
    vocab = len(tokenizer.hf)
    for trial in range(150):
        skip = trial % 2 == 0
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        ids = [rng.randrange(3) if rng.random() < 0.1 else rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        fast = IncrementalDetokenizer(tokenizer, prompt, skip)
        slow = IncrementalDetokenizer(tokenizer, prompt, skip, use_stream=False)
        for t in ids:
            assert fast.add(t) == slow.add(t)
            assert (fast.ids, fast.prefix_offset, fast.read_offset) == (slow.ids, slow.prefix_offset, slow.read_offset)


def test_forked_detokenizers_are_independent(tokenizer):
    """Fork while a character is incomplete ("Hi 🎉" and "Hi 🎈" share their first two emoji
    tokens), then feed parent and child in turn: each equals its own full decode."""
    party = tokenizer.hf.encode("Hi 🎉 and more", add_special_tokens=False)
    balloon = tokenizer.hf.encode("Hi 🎈 café", add_special_tokens=False)
    split = next(i for i, (a, b) in enumerate(zip(party, balloon)) if a != b)
    assert tokenizer.decode(party[:split]).endswith(REPLACEMENT_CHAR)
    parent = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say:"))
    head = "".join(parent.add(t) for t in party[:split])
    child = parent.fork()
    texts = {"parent": head, "child": head}
    for i in range(split, max(len(party), len(balloon))):
        texts["parent"] += parent.add(party[i]) if i < len(party) else ""
        texts["child"] += child.add(balloon[i]) if i < len(balloon) else ""
    assert texts == {"parent": tokenizer.decode(party), "child": tokenizer.decode(balloon)}
