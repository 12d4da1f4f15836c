"""Tool fields into the prompt (server/api/tools.py) on the real tokenizer: SmolLM2's template
does not read `tools`, so definitions, calls and results become Hermes text in ChatML turns;
a template that reads `tools` gets them natively; tool_choice none leaves them out."""
from __future__ import annotations

import json

import pytest

from server.api.protocol import ChatCompletionRequest
from server.api.tools import ToolReplies, chat_messages, render_chat, template_renders_tools
from server.engine.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "Local time",
                                           "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}]
HISTORY = [
    {"role": "user", "content": "Time in Oslo and Lima?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "Europe/Oslo"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "America/Lima"}'}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "14:00"},
    {"role": "tool", "tool_call_id": "call_b", "content": "08:00"},
]
# A minimal template of the Qwen2.5 kind: it reads `tools` and the calls itself.
NATIVE = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
          "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
          "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}"
          "{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}\n{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer(model_dir)


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": HISTORY, **fields})


def test_smollm_template_gets_hermes_text(tokenizer):
    assert not template_renders_tools(tokenizer.hf)
    messages = chat_messages(request(tools=TOOLS), native=False)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in messages[0]["content"]
    assert messages[2]["content"] == (
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "America/Lima"}}\n</tool_call>')
    assert messages[3]["content"] == "<tool_response>\n14:00\n</tool_response>\n<tool_response>\n08:00\n</tool_response>"
    text = tokenizer.decode(render_chat(tokenizer, request(tools=TOOLS), messages, False), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n# Tools") and text.endswith("<|im_start|>assistant\n")


def test_system_message_keeps_its_text(tokenizer):
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "system", "content": "Be brief."}] + HISTORY,
                                                 "tools": TOOLS})
    first = chat_messages(body, native=False)[0]
    assert first["role"] == "system" and first["content"].startswith("Be brief.\n\n# Tools")


def test_tool_choice_none_leaves_the_definitions_out():
    messages = chat_messages(request(tools=TOOLS, tool_choice="none"), native=False)
    assert messages[0]["role"] == "user" and "<tools>" not in json.dumps(messages)
    assert ToolReplies.for_request(request(tools=TOOLS, tool_choice="none")) is None
    assert ToolReplies.for_request(request()) is None


def test_native_template_reads_tools_and_calls(tokenizer, model_dir):
    native = Tokenizer(model_dir)
    native.hf.chat_template = NATIVE
    assert template_renders_tools(native.hf)
    body = request(tools=TOOLS)
    messages = chat_messages(body, native=True)
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"tz": "Europe/Oslo"}  # HF: objects
    text = native.decode(render_chat(native, body, messages, True), skip_special_tokens=False)
    # (HF renders templates with trim_blocks: the newline after a block tag goes)
    assert text.startswith("TOOLS:get_time;<user>Time in Oslo and Lima?<assistant>")
    assert '[get_time {"tz": "Europe/Oslo"}][get_time {"tz": "America/Lima"}]' in text
    assert text.endswith("<tool>14:00(call_a)<tool>08:00(call_b)")
