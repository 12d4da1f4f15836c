"""Tool calling over real HTTP with the `openai` client: a forced call (named, or required),
streamed and not, whose arguments validate against the function's schema; the tool's result
sent back as a `tool` message and answered with content; auto mode well-formed (streamed ==
non-streamed); a forced call under best_of (every candidate valid); and the 400s
that name the field. Runs on the session's server (SmolLM2-135M-Instruct, key `test-key`)."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.e2e
MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "required": ["city", "unit"], "properties": {
    "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
TIME = {"type": "object", "required": ["timezone"], "properties": {"timezone": {"type": "string", "maxLength": 16}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="test-key", max_retries=0, timeout=300)


def check_call(name: str, arguments: str) -> dict:
    value = json.loads(arguments)
    jsonschema.validate(value, SCHEMAS[name])
    return value


def streamed_calls(chunks) -> tuple[str, dict[int, dict], str | None]:
    """(content, index -> {id, name, arguments}, finish_reason) accumulated from deltas."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or ():
                call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, calls, finish


def test_named_call_then_tool_result_then_answer(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED,
                                           max_tokens=48, temperature=0.0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    check_call("get_weather", call.function.arguments)
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=24, temperature=0.0)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason in ("stop", "length")
    # The tool turn reached the prompt: the answer differs from one without it.
    without = client.chat.completions.create(model=MODEL, messages=ASK, tool_choice="none", tools=TOOLS,
                                             max_tokens=24, temperature=0.0)
    assert without.usage.prompt_tokens < answer.usage.prompt_tokens


def test_required_call_streamed_equals_non_streamed(client):
    sampling = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                    max_tokens=48, temperature=0.0)
    whole = client.chat.completions.create(**sampling)
    [call] = whole.choices[0].message.tool_calls
    check_call(call.function.name, call.function.arguments)
    content, calls, finish = streamed_calls(client.chat.completions.create(**sampling, stream=True))
    assert finish == "tool_calls" and content == "" and list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    assert (calls[0]["name"], calls[0]["arguments"]) == (call.function.name, call.function.arguments)
    # Streamed tool result, then a streamed answer with content.
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0]["id"], "type": "function", "function": {"name": calls[0]["name"],
                                                              "arguments": calls[0]["arguments"]}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny, 21 degrees"}]
    text, none, finish = streamed_calls(client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=24, temperature=0.0,
        stream=True))
    assert text and not none and finish in ("stop", "length")


def test_required_sampled_calls_all_validate(client):
    for seed in range(3):
        out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                             max_tokens=96, temperature=1.0, seed=seed)
        choice = out.choices[0]
        if choice.finish_reason == "length":  # a sampled reply may run on into more calls
            continue
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            check_call(call.function.name, call.function.arguments)


def test_auto_is_well_formed_and_streams_the_same(client):
    sampling = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=32, temperature=0.0)
    choice = client.chat.completions.create(**sampling).choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            json.loads(call.function.arguments)
    else:
        assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    content, calls, finish = streamed_calls(client.chat.completions.create(**sampling, stream=True))
    assert (content or None, finish) == (choice.message.content or None, choice.finish_reason)
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]


def test_forced_call_composes_with_best_of(client):
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=48,
                                         temperature=1.0, seed=4, extra_body={"best_of": 3})
    [call] = out.choices[0].message.tool_calls
    check_call("get_weather", call.function.arguments)
    for cand in out.model_extra["alignment"]["best_of_n"]["candidates"]:  # every candidate is a valid call
        assert cand["text"].startswith("<tool_call>\n")
        body = json.loads(cand["text"].removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
        check_call(body["name"], json.dumps(body["arguments"]))


@pytest.mark.parametrize("fields,param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": TOOLS, "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "rain": {}}, "tool_choice"),
])
def test_bad_tool_fields_are_400s_naming_them(client, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, extra_body=fields)
    assert err.value.body["param"] == param, err.value.body


def test_tool_calls_only_on_assistant_messages(client):
    bad = [{"role": "user", "content": "x", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=bad, max_tokens=4)
    assert err.value.body["param"] == "messages.0"
