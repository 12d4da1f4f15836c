"""Structured outputs and logit_bias over real HTTP with the `openai` client: response_format
(json_schema streamed and not, json_object), vLLM's guided_* fields, logit_bias, composition
with best_of + a reward model, GenARM and an adapter, and the 400s that name the field."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from tests.adapters.real_lora import ATTENTION, make_real_adapter
from tests.conftest import ServerProcess
from tests.methods.adapters import make_reward_adapter

pytestmark = pytest.mark.e2e
MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Describe a person in JSON."}]
PERSON = {"type": "object", "required": ["name", "age", "tags"], "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["kind", "tall", "funny"]}, "maxItems": 2}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def srv(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("structured-adapters")
    make_real_adapter(model_dir, root / "arm", ATTENTION, 8, seed=11, std=0.1)
    make_reward_adapter(model_dir, root / "rm", seed=5)
    s = ServerProcess("--lora-modules", f"arm={root / 'arm'}", "--lora-modules", f"rm={root / 'rm'}",
                      "--num-kv-blocks", "512", "--max-model-len", "512", api_key="k")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="k", max_retries=0, timeout=300)


def valid(text: str, schema=PERSON):
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def test_json_schema_streamed_and_not(client):
    sampling = dict(model=MODEL, messages=ASK, max_tokens=48, temperature=1.0, seed=3, response_format=FORMAT)
    whole = client.chat.completions.create(**sampling)
    assert whole.choices[0].finish_reason == "stop"
    valid(whole.choices[0].message.content)
    chunks = client.chat.completions.create(**sampling, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content  # same seed, same text, either way
    obj = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": 'Reply with a JSON object with the key "name".'}],
        max_tokens=48, temperature=0.0, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop", obj.choices[0].message.content
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    text = client.completions.create(model=MODEL, prompt="A person:", max_tokens=48, temperature=0.0,
                                     extra_body={"response_format": FORMAT}).choices[0].text
    valid(text)


def test_guided_fields(client):
    choice = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=8, temperature=0.0,
        extra_body={"guided_choice": ["yes", "no"]}).choices[0].message.content
    assert choice in ("yes", "no")
    regex = r"[0-9]{3}-[0-9]{4}"
    phone = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=12, temperature=1.0, seed=2,
                                      extra_body={"guided_regex": regex}).choices[0].text
    assert re.fullmatch(regex, phone), phone
    guided = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=48, temperature=0.0,
                                            extra_body={"guided_json": json.dumps(PERSON)})
    valid(guided.choices[0].message.content)


def test_guided_grammar_and_vllms_structured_outputs(client):
    ebnf = 'root ::= ("red" | "green") " " [0-9] [0-9]?'
    for extra in ({"guided_grammar": ebnf}, {"structured_outputs": {"grammar": ebnf}}):
        text = client.completions.create(model=MODEL, prompt="A colour and a number:", max_tokens=8, temperature=1.0,
                                         seed=3, extra_body=extra).choices[0].text
        assert re.fullmatch(r"(red|green) [0-9][0-9]?", text), (extra, text)
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=8, temperature=0.0)
    assert client.chat.completions.create(**ask, extra_body={"structured_outputs": {"choice": ["yes", "no"]}}) \
        .choices[0].message.content in ("yes", "no")
    phone = client.chat.completions.create(**ask, extra_body={"structured_outputs": {"regex": "[0-9]{3}"}})
    assert re.fullmatch("[0-9]{3}", phone.choices[0].message.content)
    person = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=48, temperature=0.0,
                                            extra_body={"structured_outputs": {"json": PERSON}})
    valid(person.choices[0].message.content)


def test_logit_bias_through_the_client(client, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    [banana] = tok.encode(" banana", add_special_tokens=False)
    forced = client.completions.create(model=MODEL, prompt="My favourite fruit is", max_tokens=3, temperature=0.0,
                                       logit_bias={str(banana): 100})
    assert forced.choices[0].text == " banana" * 3
    plain = client.completions.create(model=MODEL, prompt="My favourite fruit is", max_tokens=4, temperature=0.0,
                                      logprobs=0)
    first = plain.choices[0].logprobs.tokens[0]
    [first_id] = tok.encode(first, add_special_tokens=False)
    banned = client.completions.create(model=MODEL, prompt="My favourite fruit is", max_tokens=4, temperature=0.0,
                                       logprobs=0, logit_bias={str(first_id): -100})
    assert first not in banned.choices[0].logprobs.tokens


def test_structured_composes_with_best_of_genarm_and_an_adapter(client):
    sampling = dict(model=MODEL, messages=ASK, max_tokens=48, temperature=1.0, seed=7, response_format=FORMAT)
    best = client.chat.completions.create(**sampling, extra_body={"best_of": 3, "reward_model": "rm"})
    valid(best.choices[0].message.content)
    report = best.model_extra["alignment"]["best_of_n"]
    assert report["scorer"] == "rm" and len(report["candidates"]) == 3
    for cand in report["candidates"]:  # every candidate is valid, not only the chosen one
        valid(cand["text"])
    guided = client.chat.completions.create(**sampling, extra_body={"genarm": {"reward_model": "arm"}})
    valid(guided.choices[0].message.content)
    assert guided.model_extra["alignment"]["genarm"]["guided_tokens"] > 0
    adapted = client.chat.completions.create(**{**sampling, "model": "arm"})
    valid(adapted.choices[0].message.content)
    dola = client.chat.completions.create(**sampling, extra_body={"dola_layers": [8], "repetition_penalty": 1.2})
    valid(dola.choices[0].message.content)


@pytest.mark.parametrize("fields,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(?<=a)b"}}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"logit_bias": {"banana": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "root ::= "}, "guided_grammar"),
    ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"grammar": "root ::= ", "json_object": False}}, "structured_outputs"),
    ({"guided_grammar": 'root ::= "a"', "guided_regex": "a"}, "guided_regex"),
    ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "rag": {"index": "any", "mode": "extractive"}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "rain": {}}, "response_format"),
    ({"min_tokens": 9}, "min_tokens"),
    ({"allowed_token_ids": [10**9]}, "allowed_token_ids"),
])
def test_bad_fields_are_400s_naming_them(client, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, extra_body=fields)
    assert err.value.body["param"] == param, err.value.body
    assert "/project/" not in err.value.body["message"]  # no xgrammar source paths
