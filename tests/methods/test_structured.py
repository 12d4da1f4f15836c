"""Structured outputs and logit rules on the real engine (SmolLM2-135M, float32): every output
under a JSON schema parses and validates with `jsonschema`, choices and regexes match, forks,
rewinds and methods (DoLa, GenARM, best-of-N with an RM, block search, an adapter) keep it
valid; logit_bias, min_tokens, min_p, allowed_token_ids and bad_words do what they say."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from server.engine.constraints import constrain
from server.engine.logit_rules import bad_word_token_seqs, build_rules
from server.engine.sequence import Request, SamplingParams, Sequence
from server.methods.best_of_n import BestOfN
from server.methods.block_search import BlockSearch, BlockSearchOptions
from server.methods.dola import DoLa
from server.methods.genarm import GenARM
from server.methods.structured import Grammars, GrammarSpec, StructuredError
from tests.methods.conftest import chat_ids, run_requests

S = {"type": "string", "maxLength": 10}
I9 = {"type": "integer", "minimum": 0, "maximum": 9}


def obj(required=None, **props):
    return {"type": "object", "properties": props, "required": list(props) if required is None else required}


SCHEMAS = [
    obj(name=S, age={"type": "integer", "minimum": 0, "maximum": 120}),
    obj(user=obj(id={"type": "integer", "minimum": 1, "maximum": 9999},
                 email={"type": "string", "pattern": "^[a-z]{1,6}@[a-z]{1,6}\\.com$"}), active={"type": "boolean"}),
    obj(tags={"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3}),
    obj(color={"enum": ["red", "green", "blue"]}),
    obj(price={"type": "number", "minimum": 0, "maximum": 100}),
    obj(["title"], title=S, subtitle=S),
    {"type": "array", "items": I9, "minItems": 2, "maxItems": 4},
    {"enum": ["yes", "no", "maybe"]},
    obj(version={"const": "1.0"}, ok={"type": "boolean"}),
    obj(value={"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "string", "maxLength": 6}]}),
    obj(items={"type": "array", "items": obj(name={"type": "string", "maxLength": 8},
                                             qty={"type": "integer", "minimum": 1, "maximum": 20}),
               "minItems": 1, "maxItems": 2}),
    obj(phone={"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}),
    obj(note={"type": ["string", "null"], "maxLength": 10}),
    obj(n={"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}),
    {"type": "boolean"},
    {"$defs": {"point": obj(x={"type": "integer", "minimum": -9, "maximum": 9}, y=I9)},
     **obj(a={"$ref": "#/$defs/point"}, b={"$ref": "#/$defs/point"})},
    obj(code={"type": "string", "minLength": 3, "maxLength": 5}),
    obj(a=obj(b=obj(c={"type": "integer", "minimum": 0, "maximum": 5}))),
    {"type": "array", "prefixItems": [{"type": "string", "maxLength": 5}, I9], "items": False},
    obj(level={"enum": [1, 2, 3]}, label={"enum": ["low", "high"]}),
    {"type": "object", "properties": {"x": {"type": "boolean"}, "y": {"type": "boolean"}},
     "additionalProperties": False},
    obj(days={"type": "array", "items": {"enum": ["mon", "tue", "wed"]}, "maxItems": 3}),
    obj(score={"type": "number", "minimum": -1, "maximum": 1}, rank={"type": "integer", "minimum": 1, "maximum": 3}),
    {"type": "integer", "minimum": 10, "maximum": 20},
]


@pytest.fixture(scope="module")
def eng(model_dir, method_adapters):
    """One engine with the method adapters and room for every schema's two requests at once."""
    from adapters.peft_format import load_peft_adapter
    from tests.conftest import make_engine

    engine = make_engine(model_dir, num_kv_blocks=1024)
    for name, path in method_adapters.items():
        engine.add_adapter(name, load_peft_adapter(path, engine.model_config, 64, name))
    return engine


@pytest.fixture(scope="module")
def grammars(eng):
    return Grammars.for_engine(eng)


def text_of(engine, out, index=0) -> str:
    return engine.tokenizer.decode(out["tokens"][index])


def ask(engine, schema) -> list[int]:
    # NOTE: the schema is not in the prompt: the grammar alone must make the reply valid (and
    # short prompts share their cached blocks, which keeps the file fast).
    return chat_ids(engine, "Reply in JSON.")


def test_every_schema_greedy_and_sampled_validates(eng, grammars):
    assert len(SCHEMAS) >= 20
    jobs = {}
    for i, schema in enumerate(SCHEMAS):
        for mode, extra in (("greedy", {"temperature": 0.0}), ("sampled", {"temperature": 1.0, "seed": i})):
            params = SamplingParams(max_tokens=64, constraint=grammars.constraint(GrammarSpec("json", schema, "x")),
                                    **extra)
            jobs[f"{i}-{mode}"] = (ask(eng, schema), params, {})
    outs = run_requests(eng, jobs)
    for rid, out in outs.items():
        schema = SCHEMAS[int(rid.split("-")[0])]
        assert out["tokens"][0][-1] in eng.eos_token_ids, (rid, text_of(eng, out))  # ended by the grammar
        jsonschema.validate(json.loads(text_of(eng, out)), schema)
    assert not eng.requests and eng.kv.pool.num_used_blocks == 0


def test_json_object_choice_regex_and_a_fork(eng, grammars):
    regex = r"[A-Z][a-z]{2,5}-[0-9]{2}"
    choices = ["Paris", "London", "New York"]
    fork_schema = SCHEMAS[0]
    jobs = {
        "fork": (ask(eng, fork_schema), SamplingParams(  # n = 3: each forked output keeps its own state
            n=3, max_tokens=40, temperature=1.0, seed=5,
            constraint=grammars.constraint(GrammarSpec("json", fork_schema, "x"))), {}),
        "obj": (chat_ids(eng, 'Reply with a JSON object with the key "name".'), SamplingParams(
            max_tokens=48, temperature=0.0, constraint=grammars.constraint(GrammarSpec("json", None, "x"))), {}),
        "choice": (chat_ids(eng, "Which city is the capital of France?"), SamplingParams(
            max_tokens=8, temperature=0.0, constraint=grammars.constraint(GrammarSpec("choice", tuple(choices), "x")))
                   , {}),
        "regex": (chat_ids(eng, "Make up a product code."), SamplingParams(
            max_tokens=16, temperature=1.0, seed=2, constraint=grammars.constraint(GrammarSpec("regex", regex, "x")))
                  , {}),
    }
    outs = run_requests(eng, jobs)
    cat = json.loads(text_of(eng, outs["obj"]))
    assert isinstance(cat, dict), cat
    assert text_of(eng, outs["choice"]) in choices
    assert re.fullmatch(regex, text_of(eng, outs["regex"])), text_of(eng, outs["regex"])
    texts = [text_of(eng, outs["fork"], i) for i in range(3)]
    for text in texts:
        jsonschema.validate(json.loads(text), fork_schema)
    assert len(set(texts)) > 1


def test_matcher_state_follows_rewinds_and_forks(eng, grammars):
    """The cached matchers give, at every step of a rewound and forked history, exactly the
    mask of a fresh xgrammar matcher fed the same tokens."""
    import xgrammar as xgr

    schema = SCHEMAS[0]
    compiled = grammars.compile(GrammarSpec("json", schema, "x"))
    c = grammars.constraint(GrammarSpec("json", schema, "x"))
    tok = eng.tokenizer.hf
    good = tok.encode('{"name": "Bob", "age": 42}', add_special_tokens=False)
    other = tok.encode('{"name": "Alice", "age": 7}', add_special_tokens=False)
    prompt = [1, 2, 3]
    request = Request("r", prompt, SamplingParams())

    def reference(tokens):
        m = xgr.GrammarMatcher(compiled)
        assert all(m.accept_token(t) for t in tokens)
        mask = torch.empty((eng.model_config.vocab_size + 31) // 32, dtype=torch.int32)
        m.fill_next_token_bitmask(mask)
        return mask

    seq = Sequence(10_000, request, 0, list(prompt), len(prompt))
    history = ([good[:i] for i in range(len(good) + 1)] + [good[:3], good[:3] + other[3:6], good[:5], good[:2]]
               + [other[:i] for i in range(len(other) + 1)])
    for tokens in history:  # grow, rewind, diverge, regrow
        seq.token_ids = prompt + tokens
        assert torch.equal(c.allowed_tokens(seq), reference(tokens)), tokens
    assert c.num_fresh == 1 and c.num_forked == 0  # one matcher, rolled back and advanced
    seq.token_ids = prompt + good[:5]
    c.allowed_tokens(seq)
    child = Sequence(10_001, request, 0, prompt + good[:7], len(prompt))  # a fork that went on
    assert torch.equal(c.allowed_tokens(child), reference(good[:7]))
    assert c.num_fresh == 1 and c.num_forked == 1
    # A token the grammar rejects (forced in by hand): only ending is left.
    off = Sequence(10_002, request, 0, prompt + tok.encode("hello", add_special_tokens=False), len(prompt))
    assert c.allowed_tokens(off) == c.stop_token_ids


def test_structured_composes_with_methods_and_an_adapter(eng, grammars):
    schema = obj(ok={"type": "boolean"}, n=I9)  # short replies: methods cost several streams each
    ids = ask(eng, schema)

    def params(**kw):
        return SamplingParams(max_tokens=24, constraint=grammars.constraint(GrammarSpec("json", schema, "x")), **kw)

    pad = eng.tokenizer.hf.pad_token_id
    jobs = {
        "dola": (ids, params(temperature=0.0, repetition_penalty=1.2), {"method": DoLa([8], 0.1, False)}),
        "genarm": (ids, params(temperature=1.0, seed=3), {"method": GenARM("arm", 1.0)}),
        "best_of": (ids, params(temperature=1.0, seed=4), {"method": BestOfN(3, 1, "rm", None, pad)}),
        "search": (ids, params(temperature=1.0, seed=6), {"method": BlockSearch(BlockSearchOptions(
            reward_model="rm", beam_width=2, block_tokens=8, max_blocks=3), None, pad)}),
        "adapter": (ids, params(temperature=1.0, seed=5), {"adapter_id": eng.resolve_adapter("arm")}),
    }
    outs = run_requests(eng, jobs)
    for rid, out in outs.items():
        jsonschema.validate(json.loads(text_of(eng, out)), schema)
    for cand in outs["best_of"]["alignment"]["best_of_n"]["candidates"]:  # every candidate, not only the best
        jsonschema.validate(json.loads(cand["text"]), schema)
    assert not eng.requests and eng.kv.pool.num_used_blocks == 0


def test_bad_schemas_and_regexes_are_refused(grammars):
    for spec in (GrammarSpec("json", {"type": "strin"}, "response_format"),
                 GrammarSpec("json", {"properties": {"a": {"$ref": "#/nope"}}}, "response_format"),
                 GrammarSpec("json", {"minLength": -1}, "guided_json"),
                 GrammarSpec("regex", "(", "guided_regex"),
                 GrammarSpec("regex", "(?<=a)b", "guided_regex")):
        with pytest.raises(StructuredError) as err:
            grammars.constraint(spec)
        assert err.value.param == spec.param and "/project/" not in str(err.value)


def greedy(eng, jobs: dict[str, tuple[list[int], int, dict]]) -> dict[str, list[int]]:
    """Tokens of each (prompt, max_tokens, SamplingParams fields) job, greedy unless the fields
    say otherwise, all in one batch."""
    outs = run_requests(eng, {rid: (ids, SamplingParams(max_tokens=n, **{"temperature": 0.0, **kw}), {})
                              for rid, (ids, n, kw) in jobs.items()})
    return {rid: out["tokens"][0] for rid, out in outs.items()}


def holds(tokens: list[int], word: list[int]) -> bool:
    return any(tokens[i:i + len(word)] == word for i in range(len(tokens) - len(word) + 1))


def test_logit_rules(eng):
    """logit_bias -100 bans a token greedy decoding used, +100 forces one; min_tokens holds the
    end back; min_p = 1 makes sampling greedy; allowed_token_ids and bad_words hold."""
    vocab, tok = eng.model_config.vocab_size, eng.tokenizer
    fruits, short, sea = (chat_ids(eng, t) for t in ("Name three fruits.", "Reply with one word: yes or no?",
                                                      "Tell me about the sea."))
    plain = greedy(eng, {"fruits": (fruits, 12, {}), "short": (short, 40, {}), "sea": (sea, 12, {})})
    assert plain["short"][-1] in eng.eos_token_ids and len(plain["short"]) < 8, plain["short"]
    banned = plain["fruits"][0]
    [banana] = tok.hf.encode(" banana", add_special_tokens=False)
    bad = bad_word_token_seqs(tok, [tok.decode(plain["sea"]).split()[1]])
    allowed = sorted(set(plain["short"]) | {5, 6, 7})
    ends = eng.eos_token_ids
    out = greedy(eng, {
        "min_p": (sea, 12, {"temperature": 1.0, "seed": 1, "min_p": 1.0}),
        "ban": (fruits, 12, {"logit_rules": build_rules(logit_bias={str(banned): -100}, vocab_size=vocab)}),
        "force": (fruits, 4, {"logit_rules": build_rules(logit_bias={str(banana): 100}, vocab_size=vocab)}),
        "min_tokens": (short, 10, {"min_tokens": 8, "logit_rules": build_rules(
            min_tokens=8, max_tokens=10, end_token_ids=ends, vocab_size=vocab)}),
        "allowed": (sea, 12, {"logit_rules": build_rules(allowed_token_ids=allowed, vocab_size=vocab)}),
        "bad_words": (sea, 12, {"logit_rules": build_rules(bad_words=bad, vocab_size=vocab)}),
    })
    assert banned not in out["ban"] and out["ban"] != plain["fruits"]
    assert out["force"] == [banana] * 4
    assert len(out["min_tokens"]) >= 8 and not set(out["min_tokens"][:7]) & ends
    assert set(out["allowed"]) <= set(allowed)
    assert any(holds(plain["sea"], w) for w in bad) and not any(holds(out["bad_words"], w) for w in bad), bad
    assert out["min_p"] == plain["sea"]  # min_p = 1 keeps only the top token: sampling is greedy


def test_constrain_leaves_plain_rows_alone_and_lets_the_constraint_win():
    """Rows without rules are untouched (no copy when no row has any); a bias that bans all a
    constraint allows gives the constraint alone."""
    class Only:
        def __init__(self, allowed):
            self.allowed = allowed

        def allowed_tokens(self, seq):
            return self.allowed

    plain = Request("p", [1], SamplingParams())
    logits = torch.randn(3, 70)
    seqs = [Sequence(i, plain, 0, [1], 1) for i in range(3)]
    assert constrain(logits, seqs) is logits
    words = torch.zeros(3, dtype=torch.int32)
    words[1] = 1 << 3  # token 35
    packed = Request("q", [1], SamplingParams(constraint=Only(words), logit_rules=build_rules(
        logit_bias={"35": -100, "3": 50}, vocab_size=70) + build_rules(allowed_token_ids=[1, 2], vocab_size=70)))
    listed = Request("l", [1], SamplingParams(constraint=Only([4, 9])))
    rows = [Sequence(10, plain, 0, [1], 1), Sequence(11, packed, 0, [1], 1), Sequence(12, listed, 0, [1], 1)]
    out = constrain(logits, rows)
    assert torch.equal(out[0], logits[0])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [35] and out[1, 35] == logits[1, 35]
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [4, 9]
