"""The Hermes tool-call format (server/methods/tool_calls.py) on hand-written model outputs:
text + one call, two calls, malformed JSON and unknown names left as content, unclosed blocks;
the streaming parser, fed any split of the text, releases what the whole-text parser returns;
and the forced-call grammar accepts exactly the calls the functions' schemas allow."""
from __future__ import annotations

import json
import random

import pytest

from server.methods.tool_calls import ToolCallParser, parse_tool_calls, render_call, tool_call_grammar

NAMES = {"get_weather", "get_time"}
CALL_W = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_T = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'

# (model output, content, [(name, arguments)])
CASES = [
    ("Just text, no calls.", "Just text, no calls.", []),
    (CALL_W, None, [("get_weather", {"city": "Paris"})]),
    ("Let me check.\n" + CALL_W, "Let me check.", [("get_weather", {"city": "Paris"})]),
    (CALL_W + "\n" + CALL_T, None, [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "UTC"})]),
    ("A " + CALL_W + " B", "A  B", [("get_weather", {"city": "Paris"})]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>', []),  # malformed JSON
    ('<tool_call>{"name": "launch", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "launch", "arguments": {}}</tool_call>', []),  # not an offered function
    ('<tool_call>{"name": "get_time", "arguments": "UTC"}</tool_call>',
     '<tool_call>{"name": "get_time", "arguments": "UTC"}</tool_call>', []),  # arguments not an object
    ('<tool_call>{"name": "get_time", "parameters": {"timezone": "CET"}}</tool_call>', None,
     [("get_time", {"timezone": "CET"})]),  # a fine-tune's "parameters" spelling
    ('<tool_call>{"name": "get_time", "arguments": {}}', None, [("get_time", {})]),  # unclosed, whole JSON
    ('Text <tool_call>{"name": "get_ti', 'Text <tool_call>{"name": "get_ti', []),  # unclosed, cut JSON
    ("ends with a partial tag <tool_", "ends with a partial tag <tool_", []),
    ("   \n", None, []),
    ('"<tool_call>" in quotes, then ' + CALL_T, '"<tool_call>" in quotes, then ' + CALL_T, []),
]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_parse_whole_output(text, content, calls):
    got_content, got = parse_tool_calls(text, NAMES)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in got)
    assert len({c.id for c in got}) == len(got)


@pytest.mark.parametrize("text,content,calls", CASES)
def test_streamed_splits_release_the_same(text, content, calls):
    rng = random.Random(len(text))
    for _ in range(20):
        parser, released, got = ToolCallParser(NAMES), "", []
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 else []
        for a, b in zip([0] + cuts, cuts + [len(text)]):
            step = parser.feed(text[a:b])
            released += step.content
            got += step.calls
        last = parser.finish()
        released += last.content
        got += last.calls
        assert (released or None) == content
        assert [(c.name, json.loads(c.arguments)) for c in got] == calls


def test_one_call_only_when_parallel_is_off():
    content, calls = parse_tool_calls(CALL_W + "\n" + CALL_T, NAMES, max_calls=1)
    assert content is None and [c.name for c in calls] == ["get_weather"]


def test_any_name_without_a_name_set():
    _, calls = parse_tool_calls('<tool_call>{"name": "launch", "arguments": {}}</tool_call>')
    assert [c.name for c in calls] == ["launch"]


@pytest.fixture(scope="module")
def compiler(model_dir):
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return tok, xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok))


def accepts(compiler, grammar, text: str) -> bool:
    import xgrammar as xgr

    tok, comp = compiler
    matcher = xgr.GrammarMatcher(comp.compile_grammar(grammar))
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]  # the stop token: it may end here
    return all(matcher.accept_token(t) for t in ids) and matcher.is_terminated()


def test_forced_grammar_follows_the_schemas(compiler):
    weather = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"},
                                                                     "unit": {"enum": ["c", "f"]}}}
    functions = [("get_weather", weather), ("get_time", None)]
    one = tool_call_grammar(functions, parallel=False)
    many = tool_call_grammar(functions, parallel=True)
    w = render_call("get_weather", {"city": "Oslo", "unit": "c"})
    t = render_call("get_time", {"anything": [1, 2]})
    assert accepts(compiler, one, w) and accepts(compiler, one, t)
    assert not accepts(compiler, one, w + "\n" + t)  # one call only
    assert accepts(compiler, many, w + "\n" + t + "\n" + w)
    assert not accepts(compiler, one, render_call("get_weather", {"unit": "c"}))  # city is required
    assert not accepts(compiler, one, render_call("get_weather", {"city": "Oslo", "unit": "k"}))
    assert not accepts(compiler, one, render_call("launch", {}))
    assert not accepts(compiler, one, "Sure! " + w)  # a forced call starts at once
