"""The Hermes tool-call format: how tool calls look in a model's text, both ways.

Models of the Hermes / Qwen / SmolLM2 family write a call as
`<tool_call>\\n{"name": "<function>", "arguments": {...}}\\n</tool_call>`, one block per call.
This module owns that format and nothing about HTTP:

- `tools_system_prompt(tools)`: the system-prompt block that lists the functions in that
  format, for chat templates that do not render `tools` themselves (SmolLM2's does not);
- `render_call(name, arguments)`: one block, for assistant turns in the history;
- `ToolCallParser`: incremental text -> (content, calls). Fed the whole output at once it is
  the non-streaming parser, so streamed and non-streamed replies agree by construction;
- `tool_call_grammar(functions, parallel)`: an xgrammar Grammar of one block per call (or
  several, newline-separated) whose JSON is `{"name": <that function>, "arguments": <its
  parameters schema>}`, for `tool_choice` "required" or a named function.

Parsing follows what vLLM's hermes parser does with such text (text before a block is
content; a block's JSON names the function), with two choices of our own: a block that is
not valid JSON, or names a function the request did not offer, stays in the content as it
was written (the client sees what the model said instead of losing it), and an unclosed
block at the end is still parsed (the reply hit max_tokens or a stop right after the JSON).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

START, END = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; `arguments` is a JSON object's text (OpenAI sends it as a string)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class ParsedText:
    """What a parser step released: content text and whole calls."""

    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The tool list in the Hermes / Qwen2.5 system-prompt layout (one JSON per line)."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            f"{START}{END} XML tags:\n{START}\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n' f"{END}")


def render_call(name: str, arguments: Any) -> str:
    """One call block as the model writes it (the layout the grammar forces, too)."""
    return f"{START}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{END}"


def tool_response(content: str) -> str:
    """A tool's result as the Hermes / Qwen family reads it back in a user turn."""
    return f"<tool_response>\n{content}\n</tool_response>"


class ToolCallParser:
    """Incremental parser of one output: `feed` text deltas, then `finish` once.

    NOTE: content is released with its leading and trailing whitespace held back (released
    only when more content follows), so the concatenation of everything released equals the
    stripped text outside the blocks: what the non-streamed reply carries.
    """

    def __init__(self, names: set[str] | None = None, max_calls: int | None = None) -> None:
        self.names = names  # None: any name is a call
        self.max_calls = max_calls  # parallel_tool_calls false: 1 (later calls are dropped)
        self.num_calls = 0
        self._buffer = ""  # outside: a suffix that may start a block; inside: the block so far
        self._inside = False
        self._pending_space = ""  # whitespace waiting for content after it
        self._started = False  # any content released yet (leading whitespace is dropped)

    def feed(self, text: str) -> ParsedText:
        out = ParsedText()
        self._buffer += text
        while self._buffer:
            if self._inside:
                end = self._buffer.find(END)
                if end < 0:
                    break
                self._close(self._buffer[:end], out, closed=True)
                self._buffer, self._inside = self._buffer[end + len(END):], False
                continue
            start = self._buffer.find(START)
            if start >= 0:
                self._content(self._buffer[:start], out)
                self._buffer, self._inside = self._buffer[start + len(START):], True
                continue
            keep = _partial_suffix(self._buffer, START)
            self._content(self._buffer[:len(self._buffer) - keep], out)
            self._buffer = self._buffer[len(self._buffer) - keep:]
            break
        return out

    def finish(self) -> ParsedText:
        """Release what is left: an unclosed block (parsed if its JSON is whole) or text."""
        out = ParsedText()
        if self._inside:
            self._close(self._buffer, out, closed=False)
        else:
            self._content(self._buffer, out)
        self._buffer, self._inside = "", False
        return out

    def _close(self, body: str, out: ParsedText, closed: bool) -> None:
        call = self._call(body)
        if call is None:
            self._content(START + body + (END if closed else ""), out)
        elif self.max_calls is None or self.num_calls < self.max_calls:
            out.calls.append(call)
            self.num_calls += 1

    def _call(self, body: str) -> ToolCall | None:
        try:
            value = json.loads(body)
        except (json.JSONDecodeError, RecursionError):
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        # Some Hermes fine-tunes write "parameters" for "arguments".
        arguments = value.get("arguments", value.get("parameters", {}))
        if not isinstance(arguments, dict) or (self.names is not None and value["name"] not in self.names):
            return None
        return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))

    def _content(self, text: str, out: ParsedText) -> None:
        if not text:
            return
        body = text.rstrip()
        if not body:  # whitespace only: it waits for what follows it
            self._pending_space += text
            return
        lead = self._pending_space if self._started else ""
        if not self._started:
            body = body.lstrip()
        out.content += lead + body
        self._pending_space = text[len(text.rstrip()):]
        self._started = True


def parse_tool_calls(text: str, names: set[str] | None = None,
                     max_calls: int | None = None) -> tuple[str | None, list[ToolCall]]:
    """A whole output's (content or None, calls)."""
    parser = ToolCallParser(names, max_calls)
    first, last = parser.feed(text), parser.finish()
    content = first.content + last.content
    return content or None, first.calls + last.calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def tool_call_grammar(functions: list[tuple[str, dict | None]], parallel: bool):
    """xgrammar Grammar: one call block (`parallel`: one or more, newline-separated) naming
    one of `functions` with arguments valid for that function's parameters schema (None: any
    object). Compile it with `GrammarCompiler.compile_grammar`.

    NOTE: no free whitespace inside the JSON (as for response_format): a small model given
    room for it may loop on spaces until max_tokens.
    """
    import xgrammar as xgr

    calls = []
    for name, parameters in functions:
        schema = json.dumps(parameters if parameters is not None else {"type": "object"})
        head = START + "\n" + json.dumps({"name": name}, ensure_ascii=False)[:-1] + ', "arguments": '
        calls.append(xgr.Grammar.concat(
            xgr.Grammar.from_ebnf("root ::= " + _literal(head)),
            # strict_mode: no properties beyond the schema's (a tiny model invents some).
            xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=parameters is not None),
            xgr.Grammar.from_ebnf("root ::= " + _literal("}\n" + END))))
    one = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
    if not parallel:
        return one
    # The union's own `root` rule stays; a new start rule repeats it.
    return xgr.Grammar.from_ebnf(str(one) + '\ntool_calls ::= root ("\\n" root)*\n', root_rule_name="tool_calls")


def _literal(text: str) -> str:
    """An EBNF string literal (JSON string escapes are xgrammar's too)."""
    return json.dumps(text, ensure_ascii=True)
