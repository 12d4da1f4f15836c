"""OpenAI tool calling on /v1/chat/completions: the request fields, the prompt, the reply.

In: `tools`, `tool_choice` ("none" / "auto" / "required" / a named function),
`parallel_tool_calls`, and history messages with `tool_calls` (assistant) or `role: "tool"`.
Out: `message.tool_calls` (id "call_...", type "function", function.name, function.arguments
as a JSON string), `finish_reason: "tool_calls"`, and in streams the same calls as
`delta.tool_calls` entries with their `index`.

The model-side format (Hermes `<tool_call>` blocks, the parser and the grammar) lives in
server/methods/tool_calls.py; "required" and named functions become a `GrammarSpec` of kind
"tool_calls" that server/methods/structured.py compiles like any other structured output.
This module does not touch the engine.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.methods.structured import GrammarSpec, StructuredError, check_schema
from server.methods.tool_calls import (ToolCall, ToolCallParser, parse_tool_calls, render_call, tool_response,
                                       tools_system_prompt)

MAX_TOOLS = 128  # OpenAI's limit
STRICT = ConfigDict(extra="forbid", strict=True)


class ToolError(ValueError):
    """A bad tool field: 400 naming `param` (parse_body reads `.param` off a validator's error)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class FunctionDef(BaseModel):
    model_config = STRICT

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: takes any object
    strict: bool | None = None  # forced calls always follow the schema


class ToolDef(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = STRICT

    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: NamedFunction


class CalledFunction(BaseModel):
    # NOTE: lenient like ChatMessage: clients echo back what we sent, sometimes with more keys.
    model_config = ConfigDict(extra="allow", strict=True)

    name: str
    arguments: str


class ToolCallIn(BaseModel):
    """A call in an assistant message of the history."""

    model_config = ConfigDict(extra="allow", strict=True)

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


def check_tools(tools: list[ToolDef] | None, choice: str | NamedToolChoice | None) -> None:
    """The request's tool fields together; ToolError naming the field at fault."""
    if tools is not None and len(tools) > MAX_TOOLS:
        raise ToolError("tools", f"at most {MAX_TOOLS} tools per request")
    names = [t.function.name for t in tools or ()]
    for i, tool in enumerate(tools or ()):
        if names.index(tool.function.name) != i:
            raise ToolError(f"tools.{i}.function.name", f"two tools are named {tool.function.name!r}")
        if tool.function.parameters is not None:
            try:
                check_schema(tool.function.parameters, f"tools.{i}.function.parameters")
            except StructuredError as exc:
                raise ToolError(exc.param, str(exc)) from exc
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise ToolError("tool_choice", f"tool_choice must be none, auto, required or a named function, not {choice!r}")
    if choice not in (None, "none") and not names:
        raise ToolError("tool_choice", "tool_choice is only allowed when tools are given")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise ToolError("tool_choice", f"tool_choice names {choice.function.name!r}, which is not in tools")


def tool_mode(tools: list[ToolDef] | None, choice: str | NamedToolChoice | None) -> str:
    """"none" (no tools in play), "auto", "required" or "named"; OpenAI's default is auto
    when tools are given."""
    if not tools or choice == "none":
        return "none"
    if isinstance(choice, NamedToolChoice):
        return "named"
    return choice or "auto"


def tool_grammar_spec(tools: list[ToolDef], choice: str | NamedToolChoice | None,
                      parallel: bool) -> GrammarSpec | None:
    """The grammar that forces the calls ("required", named), or None (auto / none)."""
    mode = tool_mode(tools, choice)
    if mode not in ("required", "named"):
        return None
    offered = [t.function for t in tools if mode == "required" or t.function.name == choice.function.name]
    # NOTE: a named function is exactly one call (OpenAI's meaning of naming it).
    return GrammarSpec("tool_calls", (tuple((f.name, f.parameters) for f in offered),
                                      parallel and mode == "required"), "tool_choice")


# ---- prompt side -------------------------------------------------------------------------

def template_renders_tools(hf_tokenizer) -> bool:
    """Whether the model's own chat template reads `tools` (Qwen2.5's does, SmolLM2's not)."""
    return "tools" in (hf_tokenizer.chat_template or "")


def chat_messages(body, native: bool) -> list[dict[str, Any]]:
    """The request's messages as template input. `native`: the template renders tools,
    assistant `tool_calls` and tool messages itself (HF's convention: arguments as objects).
    Otherwise they become Hermes text in the ChatML turns every template renders:
    tool definitions in the system message (a new one if the conversation has none), calls
    as `<tool_call>` blocks in the assistant turn, and consecutive tool results as
    `<tool_response>` blocks in one user turn, the way Qwen2.5's template writes them."""
    mode = tool_mode(body.tools, body.tool_choice)
    tools = [t.model_dump(exclude_none=True) for t in body.tools or ()] if mode != "none" else []
    out: list[dict[str, Any]] = []
    for i, m in enumerate(body.messages):
        try:
            text = m.text()
        except (ValueError, TypeError) as exc:
            raise ToolError(f"messages.{i}.content", str(exc)) from exc
        calls = [(c.function.name, _arguments(c.function.arguments), c.id) for c in m.tool_calls or ()]
        if native:
            msg: dict[str, Any] = {"role": m.role, "content": text}
            if calls:
                msg["tool_calls"] = [{"id": cid, "type": "function", "function": {"name": n, "arguments": a}}
                                     for n, a, cid in calls]
            if m.role == "tool" and m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        elif m.role == "tool":
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + tool_response(text)
            else:
                out.append({"role": "user", "content": tool_response(text), "_tool_results": True})
        elif calls:
            blocks = "\n".join(render_call(n, a) for n, a, _ in calls)
            out.append({"role": m.role, "content": f"{text}\n{blocks}" if text else blocks})
        else:
            out.append({"role": m.role, "content": text})
    for msg in out:
        msg.pop("_tool_results", None)
    if tools and not native:
        block = tools_system_prompt(tools)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _arguments(text: str) -> Any:
    """A history call's arguments as an object where they are JSON, else the string itself."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text


def render_chat(tokenizer, body, messages: list[dict[str, Any]], native: bool,
                add_special_tokens: bool = False) -> list[int]:
    """Prompt token ids: our tokenizer's template, or (native tools) the HF template with
    `tools`, encoded the same way (the template writes any BOS itself; /tokenize may ask for
    the tokenizer's specials on top)."""
    mode = tool_mode(body.tools, body.tool_choice)
    if not (native and mode != "none") and not add_special_tokens:
        return tokenizer.apply_chat_template(messages, body.add_generation_prompt)
    if not tokenizer.hf.chat_template:
        raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
    extra = {"tools": [t.model_dump(exclude_none=True) for t in body.tools]} if native and mode != "none" else {}
    text = tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=body.add_generation_prompt,
                                            **extra)
    return tokenizer.hf.encode(text, add_special_tokens=add_special_tokens)


# ---- reply side --------------------------------------------------------------------------

def _wire(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return {"index": index, **out} if index is not None else out


class ToolReplies:
    """Per request: turns each output's text into content + tool_calls (none mode: not made)."""

    def __init__(self, tools: list[ToolDef], parallel: bool) -> None:
        self.names = {t.function.name for t in tools}
        self.max_calls = None if parallel else 1
        self._streams: dict[int, tuple[ToolCallParser, list[int]]] = {}  # index -> (parser, [calls sent])

    @classmethod
    def for_request(cls, body) -> "ToolReplies | None":
        if getattr(body, "tools", None) is None or tool_mode(body.tools, body.tool_choice) == "none":
            return None
        return cls(body.tools, body.parallel_tool_calls is not False)

    def finish_choice(self, choice: dict[str, Any]) -> None:
        """A non-streamed chat choice: parse its content in place."""
        message = choice["message"]
        content, calls = parse_tool_calls(message["content"] or "", self.names, self.max_calls)
        # NOTE: the parsed content even without calls: a stream releases the same (stripped) text.
        message["content"] = content if calls else (content or "")
        if calls:
            message["tool_calls"] = [_wire(c) for c in calls]
            if choice["finish_reason"] == "stop":
                choice["finish_reason"] = "tool_calls"

    def stream_choice(self, choice: dict[str, Any]) -> dict[str, Any] | None:
        """A streamed chat choice rewritten: text held while it may be a call, whole calls as
        `tool_calls` deltas; None when nothing is left to send in this chunk."""
        parser, sent = self._streams.setdefault(choice["index"], (ToolCallParser(self.names, self.max_calls), [0]))
        delta = choice["delta"]
        step = parser.feed(delta.get("content") or "")
        if choice["finish_reason"] is not None:
            last = parser.finish()
            step.content, step.calls = step.content + last.content, step.calls + last.calls
        delta["content"] = step.content
        if step.calls:
            delta["tool_calls"] = [_wire(c, sent[0] + k) for k, c in enumerate(step.calls)]
            sent[0] += len(step.calls)
            delta["content"] = step.content or None
        if choice["finish_reason"] == "stop" and sent[0]:
            choice["finish_reason"] = "tool_calls"
        if not (step.content or step.calls or "role" in delta or choice["finish_reason"] or choice.get("logprobs")):
            return None
        return choice
