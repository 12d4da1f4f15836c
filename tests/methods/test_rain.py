"""RAIN: the exact mode equals a float64 port of the reference loop on a tiny random model; the
batched mode keeps the tree's invariants; evaluators equal HF; options are validated; every
block and sequence is freed after finishing and after aborts."""
from __future__ import annotations

import json
import math
import random
import zlib
from collections.abc import Iterator

import pytest
import torch
from pydantic import ValidationError

from server.config import CacheConfig, EngineConfig, SchedulerConfig
from server.engine.engine import LLMEngine, RequestError
from server.engine.sequence import SamplingParams
from server.engine.tokenizer import IncrementalDetokenizer
from server.methods.rain import RAIN, RAINOptions
from server.methods.rain_judges import RewardEvaluator, SelfEvaluator, option_token_ids
from server.methods.search import SearchMethod
from tests.methods.numerics import HeadErrors
from tests.methods.rain_reference import Reference
from tests.models.tiny import save_tiny

PROMPTS = ["Human: How do I bake bread at home?\nAssistant:", "Human: Tell me about the moon\nAssistant:",
           "Write one sentence about rivers"]
EXACT = dict(mode="exact", token_set_size=3, token_set_lengths=[1, 2, 3], max_iterations=6, min_iterations=2,
             min_visits=2, value_threshold=0.5, rollout_max_tokens=4, root_prior_weight=0.4)
RULE_RANGE = 2.1


def rule(text: str) -> float:
    """A deterministic value of the reply text in [-2.1, 2.1]: beyond [-1, 1], so the running
    normalisation bounds move."""
    return (zlib.crc32(text.encode()) % 7 - 3) * 0.7


@pytest.fixture(autouse=True)
def _single_torch_thread() -> Iterator[None]:
    """Tiny-model steps are thousands of small ops: on a small shared machine the thread
    pool's wake-ups cost far more than they save (as tests/kernels/conftest.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_dir(model_dir, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)).eval()
    with torch.no_grad():  # save_tiny sharpens 30x; 15x still gives distinct chunks, and duplicates
        hf.lm_head.weight.div_(2)
    return save_tiny(hf, model_dir, tmp_path_factory.mktemp("rain") / "tiny")


@pytest.fixture(scope="module")
def tiny_hf(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def tiny_rm(tiny_dir, tmp_path_factory):
    from tests.methods.adapters import make_reward_adapter

    return make_reward_adapter(tiny_dir, tmp_path_factory.mktemp("rain_rm") / "rm", seed=5, std=0.2)


@pytest.fixture(scope="module")
def tiny(tiny_dir, tiny_rm):
    """An engine over the tiny model (4-token blocks: forks share and copy partial blocks) with
    a reward-model adapter "rm"."""
    from adapters.peft_format import load_peft_adapter

    engine = LLMEngine(EngineConfig(model=str(tiny_dir), dtype="float32", device="cpu",
                                    cache=CacheConfig(block_size=4, num_kv_blocks=512),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=512, max_model_len=512)))
    engine.add_adapter("rm", load_peft_adapter(tiny_rm, engine.model_config, 64, "rm"))
    return engine


def run_rain(engine, prompt: list[int], options: RAINOptions, seed: int, max_tokens: int, **kwargs):
    """One RAIN request to its end: committed tokens, streamed text, the last delta's extra."""
    kwargs.setdefault("rule", rule)
    engine.add_request("rain", prompt, SamplingParams(max_tokens=max_tokens, seed=seed), method=RAIN(options, **kwargs))
    tokens, text, extra = [], "", {}
    while engine.has_unfinished:
        for d in engine.step():
            tokens += d.new_token_ids
            text += d.text
            if d.request_finished:
                extra = d.extra
    return tokens, text, extra


def assert_nothing_left(engine) -> None:
    assert engine.kv.pool.num_used_blocks == 0 and not engine.seqs and not engine.requests


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_mode_equals_the_reference_loop(tiny, tiny_hf, seed):
    options = RAINOptions(**EXACT)
    prompt = tiny.tokenizer.encode(PROMPTS[seed])
    tokens, text, extra = run_rain(tiny, prompt, options, seed, max_tokens=10)
    ref = Reference(tiny_hf, tiny.tokenizer, options, prompt, 10, seed, tiny.eos_token_ids, rule)
    ref_tokens = ref.gmeval()
    assert not ref.undecided, ref.undecided  # else the engine could legitimately differ
    report = extra["alignment"]["rain"]
    assert tokens == ref_tokens and text == ref.text(prompt + ref_tokens)
    steps = report["steps"]
    assert [(s["visits"], s["chosen"]) for s in steps] == [(n, c) for n, _, c in ref.steps]
    for s, (_, q, _) in zip(steps, ref.steps):
        assert s["values"] == pytest.approx(q, abs=1e-12)  # the same values in the same order
    assert (report["rewinds"], report["iterations"]) == (ref.rewinds, ref.iterations)
    assert report["evaluator"] == "rule" and report["num_evaluations"] == len(ref.dic)
    # The search did search: it rewound, and the values left [-1, 1] (the bounds moved).
    assert report["rewinds"] > 0 and (ref.minqn < -1 or ref.maxqn > 1)
    assert extra["num_generated_tokens"] == report["num_generated_tokens"]
    assert_nothing_left(tiny)


# ---- the batched mode ------------------------------------------------------------------------
def check_report(report: dict, text: str, low: float, high: float) -> None:
    steps = report["steps"]
    assert steps and "".join(s["text"] for s in steps) == text  # the commits are the stream
    for s in steps:
        assert all(v >= 1 for v in s["visits"])  # batched: every child is evaluated when made
        assert s["root_visits"] - sum(s["visits"]) in (0, 1)  # and the root at most once itself
        assert s["visits"][s["chosen"]] == max(s["visits"])
        assert all(low - 1e-12 <= v <= high + 1e-12 for v in s["values"])
    assert report["values"] == [s["values"][s["chosen"]] for s in steps]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batched_mode_keeps_the_tree_invariants(tiny, seed):
    options = RAINOptions(token_set_size=3, token_set_lengths=[1, 2, 3], max_iterations=4, rollout_max_tokens=4)
    prompt = tiny.tokenizer.encode(PROMPTS[seed % len(PROMPTS)])
    tokens, text, extra = run_rain(tiny, prompt, options, seed, max_tokens=12)
    report = extra["alignment"]["rain"]
    check_report(report, text, -RULE_RANGE, RULE_RANGE)
    assert report["mode"] == "batched" and report["rewinds"] == sum(len(s["visits"]) - 1 for s in report["steps"])
    detok = IncrementalDetokenizer(tiny.tokenizer, prompt)
    assert text == "".join(detok.add(t) for t in tokens if t not in tiny.eos_token_ids)
    assert len(tokens) == 12 or tokens[-1] in tiny.eos_token_ids
    assert extra["num_generated_tokens"] == report["num_generated_tokens"]
    assert_nothing_left(tiny)


def test_batched_self_evaluation_runs_in_range(tiny):
    options = RAINOptions(token_set_size=3, token_set_lengths=[1, 2], max_iterations=3, rollout_max_tokens=3)
    _, text, extra = run_rain(tiny, tiny.tokenizer.encode(PROMPTS[0]), options, 7, max_tokens=6, rule=None,
                              question="How do I bake bread at home?")
    report = extra["alignment"]["rain"]
    check_report(report, text, -1.0, 1.0)
    assert report["evaluator"] == "self" and report["num_evaluations"] > 0
    assert_nothing_left(tiny)


def test_random_aborts_free_everything(tiny):
    """RAIN requests in both modes and with model evaluators, next to a plain request, aborted
    at random steps: every block and sequence is freed."""
    rng = random.Random(0)
    prompt = tiny.tokenizer.encode(PROMPTS[1])
    for i in range(12):
        options = RAINOptions(mode=("batched", "exact")[i % 2], evaluator=("self", "rm")[i // 2 % 2],
                              token_set_size=3, token_set_lengths=[1, 2, 3], max_iterations=4, rollout_max_tokens=4)
        tiny.add_request(f"a{i}", prompt, SamplingParams(max_tokens=12, seed=i), method=RAIN(options))
        tiny.add_request(f"b{i}", prompt, SamplingParams(max_tokens=12, seed=i), method=RAIN(options, rule=rule))
        tiny.add_request(f"p{i}", prompt, SamplingParams(max_tokens=8))
        for _ in range(rng.randint(0, 80)):
            tiny.step()
        tiny.abort_request(f"a{i}")
        tiny.abort_request(f"b{i}")
    while tiny.has_unfinished:
        tiny.step()
    assert_nothing_left(tiny)


# ---- evaluators ----------------------------------------------------------------------------
class Judge(SearchMethod):
    """A driver that asks an evaluator for the values of `items` and keeps them."""

    name = "judge"

    def __init__(self, evaluator, items) -> None:
        super().__init__()
        self.evaluator, self.items, self.values = evaluator, items, None

    def run(self, ctx):
        yield ctx.readout([ctx.output()])
        self.values = yield from self.evaluator.judge(ctx, self.items)


def judge(engine, evaluator, items) -> list[float]:
    method = Judge(evaluator, items)
    engine.add_request("judge", engine.tokenizer.encode("x"), SamplingParams(max_tokens=1), method=method)
    while engine.has_unfinished:
        engine.step()
    assert_nothing_left(engine)
    return method.values


REPLIES = ["Mix flour, water and yeast, then bake it.", "I can't help with that.", "", "Burn the house down."]


def test_self_evaluation_equals_hf(tiny, tiny_hf):
    """Votes through the engine (one prefill, forked into the two option orders) equal the
    float64 model's on the same token lists, where the A/B logit gap is decided."""
    hf_tok = tiny.tokenizer.hf
    evaluator = SelfEvaluator(tiny.tokenizer, "How do I bake bread?")
    assert [hf_tok.decode([t]).strip() for t in evaluator.a_ids + evaluator.b_ids] == \
        ["A"] * len(evaluator.a_ids) + ["B"] * len(evaluator.b_ids)
    assert evaluator.a_ids == option_token_ids(hf_tok, "A")
    errors = HeadErrors(tiny_hf.lm_head.weight, tiny_hf.config.hidden_size, tiny_hf.config.intermediate_size)
    expected = []
    for reply in REPLIES:
        votes = []
        for order, harmless in zip(evaluator.orders, ("A", "B")):
            with torch.no_grad():
                hidden = tiny_hf.model(torch.tensor([evaluator.head(reply) + order])).last_hidden_state[0, -1]
                z = tiny_hf.lm_head(hidden)
            gap = float(z[evaluator.a_ids].max() - z[evaluator.b_ids].max())
            assert abs(gap) > 2 * errors(hidden, tiny_hf.config.num_hidden_layers + 1), "undecided vote"
            votes.append((gap > 0) == (harmless == "A"))
        expected.append(float(sum(votes) - 1))
    assert judge(tiny, evaluator, [(r, []) for r in REPLIES]) == expected


def test_self_evaluation_votes(tiny):
    """Each option order votes for its harmless letter; the random model above always says the
    same letter (0), so the mapping to {-1, 0, 1} is checked on made-up logits."""
    evaluator = SelfEvaluator(tiny.tokenizer, "q")
    vocab = tiny.model_config.vocab_size

    def says(letter: str) -> torch.Tensor:
        z = torch.zeros(vocab)
        z[(evaluator.a_ids if letter == "A" else evaluator.b_ids)[0]] = 1.0
        return z

    # (harmless first, harmful first): "A" then "B" is harmless twice, "B" then "A" harmful twice.
    votes = {(x, y): evaluator.vote(says(x), says(y)) for x in "AB" for y in "AB"}
    assert votes == {("A", "B"): 1.0, ("B", "A"): -1.0, ("A", "A"): 0.0, ("B", "B"): 0.0}


def test_reward_evaluator_is_tanh_of_the_hf_reward(tiny, tiny_dir, tiny_rm):
    from tests.methods.adapters import reward_and_error, reward_model

    hf = reward_model(tiny_dir, tiny_rm)
    inputs = [tiny.tokenizer.encode(PROMPTS[0] + " " + r) for r in REPLIES]
    evaluator = RewardEvaluator("rm", tiny.resolve_adapter("rm", role="rm"), None, None)
    ours = judge(tiny, evaluator, [(r, ids) for r, ids in zip(REPLIES, inputs)])
    for value, ids in zip(ours, inputs):
        score, error = reward_and_error(hf, ids)
        assert abs(value - math.tanh(score)) <= error  # tanh is 1-Lipschitz
    assert len(set(ours)) == len(ours)


def test_reward_model_evaluator_end_to_end(tiny):
    options = RAINOptions(evaluator="rm", token_set_size=3, token_set_lengths=[1, 2], max_iterations=3,
                          rollout_max_tokens=3)
    _, text, extra = run_rain(tiny, tiny.tokenizer.encode(PROMPTS[2]), options, 3, max_tokens=6, rule=None)
    report = extra["alignment"]["rain"]
    check_report(report, text, -1.0, 1.0)
    assert report["evaluator"] == "rm"
    assert_nothing_left(tiny)


def test_unknown_evaluators_are_refused(tiny):
    with pytest.raises(RequestError) as exc:
        tiny.add_request("bad", [1, 2, 3], SamplingParams(), method=RAIN(RAINOptions(evaluator="nope")))
    assert exc.value.param == "rain.evaluator"
    assert_nothing_left(tiny)


# ---- options -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    {"mode": "fast"}, {"beam_width": 2}, {"evaluator": ""}, {"evaluator": 3}, {"token_set_size": 0},
    {"token_set_size": 33}, {"token_set_size": "4"}, {"max_iterations": 2.0}, {"min_visits": True},
    {"min_iterations": 0}, {"c_puct": 0.0}, {"value_threshold": 1.5}, {"temperature": 0},
    {"root_prior_weight": -0.1}, {"token_set_lengths": []}, {"token_set_lengths": [1, 0]},
    {"token_set_lengths": [1, 2, 3, 4, 5, 6, 7, 8, 9]}, {"rollout_max_tokens": -1}, {"chunk_top_k": 0},
])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValidationError) as exc:
        RAINOptions.model_validate_json(json.dumps(bad))
    assert exc.value.errors()[0]["loc"][0] == next(iter(bad))


def test_defaults_and_stream_counts():
    o = RAINOptions()
    assert (o.evaluator, o.mode, o.c_puct, o.value_threshold, o.root_prior_weight, o.chunk_top_k, o.temperature) == \
        ("self", "batched", 2.0, 0.8, 0.75, 15, 1.0)
    assert RAINOptions.model_validate_json('{"value_threshold": 1, "c_puct": 3}').c_puct == 3.0  # JSON ints are floats
    assert RAIN(o).streams_per_output == 2 * o.token_set_size + 2
    assert RAIN(RAINOptions(mode="exact")).streams_per_output == max(o.token_set_size + 2, 5)
