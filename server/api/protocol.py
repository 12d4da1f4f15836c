"""OpenAI wire format: pydantic request models (validated), body parsing, response builders.

`parse_body` turns raw request bytes into a request model. It runs off the event loop (a
large body must not stall other clients) and refuses, with a 400 that names the field,
anything we do not implement: silently ignoring a `response_format` type or the legacy
`functions` would return text the client did not ask for.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.engine.sequence import SamplingParams
from server.methods.block_search import BlockSearchOptions
from server.methods.knn_lm import KNNLMOptions
from server.methods.rag import RAGOptions
from server.methods.rain import RAINOptions
from server.api.tools import NamedToolChoice, ToolCallIn, ToolDef, check_tools, tool_grammar_spec
from server.methods.structured import GrammarSpec, ResponseFormat, StructuredOutputs, grammar_spec

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_N = 16
MAX_BEST_OF = 32
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_BAD_WORDS = 128


class ParamError(ValueError):
    """A validator's complaint about one field; `parse_body` reports `param` to the client."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# NOTE: strict types, as OpenAI's: `"n": true` or `"max_tokens": 16.5` are errors, not coerced.
STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class GenARMOptions(BaseModel):
    """`genarm`: guide decoding with an autoregressive reward model adapter."""

    model_config = STRICT

    reward_model: str
    alpha: float = Field(1.0, ge=0.0, le=100.0)  # = 1 / beta


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions (OpenAI + vLLM extensions)."""

    model_config = STRICT

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Test-time methods (extension fields; the `openai` client sends them via extra_body).
    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF)
    reward_model: str | None = None  # scores best_of candidates; default: mean token logprob
    dola_layers: Literal["low", "high"] | list[int] | None = None
    dola_relative_top: float = Field(0.1, ge=0.0, le=1.0)
    dola_apply_final_norm: bool = False
    genarm: GenARMOptions | None = None
    search: BlockSearchOptions | None = None  # reward-guided block search
    rain: RAINOptions | None = None  # RAIN: token-set search with self-evaluation and rewinds
    rag: RAGOptions | None = None  # retrieval into the prompt; composes with every method above
    knn_lm: KNNLMOptions | None = None  # kNN-LM: mix in next tokens of the nearest stored contexts
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # vLLM's: per prompt token
    # Structured outputs (server/methods/structured.py): OpenAI's response_format, vLLM's guided_*.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # xgrammar EBNF
    structured_outputs: StructuredOutputs | None = None  # vLLM's newer form of the guided_* fields
    # Logit rules (server/engine/logit_rules.py) and vLLM's min_p.
    logit_bias: dict[str, float] | None = None  # token id (a decimal string) -> bias in [-100, 100]
    min_tokens: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    allowed_token_ids: list[int] | None = Field(None, min_length=1)
    bad_words: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=MAX_BAD_WORDS)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _check_logit_bias(cls, v: Any) -> Any:
        """OpenAI's semantics: keys are token ids as strings, values -100..100. Checked here
        (not by the type) so every bad key or value is a 400 naming `logit_bias` itself."""
        if v is None:
            return v
        if not isinstance(v, dict):
            raise ParamError("logit_bias", "logit_bias must be an object mapping token ids to biases")
        if len(v) > MAX_LOGIT_BIAS:
            raise ParamError("logit_bias", f"logit_bias holds at most {MAX_LOGIT_BIAS} tokens")
        out = {}
        for key, value in v.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ParamError("logit_bias", f"logit_bias keys must be token ids (decimal strings), not {key!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise ParamError("logit_bias", f"logit_bias[{key!r}] must be a number in [-100, 100], not {value!r}")
            out[key] = float(value)
        return out

    def grammar_spec(self) -> GrammarSpec | None:
        return grammar_spec(self.response_format, self.guided_json, self.guided_regex, self.guided_choice,
                            self.guided_grammar, self.structured_outputs)

    def has_logit_rules(self) -> bool:
        return bool(self.logit_bias or self.min_tokens or self.min_p or self.allowed_token_ids is not None
                    or self.bad_words)

    @model_validator(mode="after")
    def _check_methods(self) -> "SamplingFields":
        if self.best_of is not None:
            if self.best_of < self.n:
                raise ParamError("best_of", f"best_of ({self.best_of}) must be >= n ({self.n})")
            if self.stream:
                raise ParamError("best_of", "best_of cannot be streamed: candidates are ranked after they finish")
        if self.reward_model is not None and self.best_of is None:
            raise ParamError("reward_model", "reward_model scores best_of candidates; set best_of too")
        if self.dola_layers is not None and self.genarm is not None:
            raise ParamError("genarm", "dola_layers and genarm cannot be combined in one request")
        methods = [name for name in ("best_of", "search", "rain", "dola_layers", "genarm")
                   if getattr(self, name) is not None]
        if len(methods) > 1 and methods != ["dola_layers", "genarm"]:
            raise ParamError(methods[1], f"{methods[0]} and {methods[1]} cannot be combined in one request yet")
        for name in ("search", "rain"):
            if getattr(self, name) is not None and self.n != 1:
                raise ParamError("n", f"{name} returns one output; use n = 1")
        if self.rain is not None and self.requested_logprobs() is not None:
            raise ParamError("logprobs", "rain draws its tokens in a tree search; logprobs are not reported")
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "stream_options is only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise ParamError("prompt_logprobs", "prompt_logprobs are returned with non-streamed responses only")
        spec = self.grammar_spec()  # raises on two specs or a guided_json that is no schema
        if spec is not None and self.rag is not None and self.rag.mode == "extractive":
            raise ParamError(spec.param, f"{spec.param} contradicts rag's extractive mode (the answer is a "
                                         "span of the passages, not JSON); use mode generate")
        if self.rain is not None and (spec is not None or self.has_logit_rules()):
            field = spec.param if spec is not None else next(
                f for f in ("logit_bias", "min_tokens", "min_p", "allowed_token_ids", "bad_words") if getattr(self, f))
            raise ParamError(field, "rain draws its tokens in its own tree search; it takes no structured "
                                    "output or logit rules")
        return self

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return v

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, v: int) -> int:
        if v == 0:
            raise ValueError("top_k must be -1 (disabled) or >= 1")
        return v

    def stop_tuple(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def to_sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
            max_tokens=max_tokens, stop=self.stop_tuple(), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logprobs=logprobs, min_p=self.min_p, min_tokens=self.min_tokens,
        )

    def method(self, render=None, pad_token_id: int | None = None, question: str | None = None):
        """A fresh per-request method for the options set (None: plain decoding). `render`
        turns a reply into the token ids a reward model scores (chat: the template);
        `question` is the human turn a self-evaluating method judges the reply to."""
        from server.methods.best_of_n import BestOfN
        from server.methods.block_search import BlockSearch
        from server.methods.rain import RAIN
        from server.methods.dola import DoLa
        from server.methods.genarm import GenARM

        if self.best_of is not None:
            return BestOfN(self.best_of, self.n, self.reward_model, render, pad_token_id)
        if self.search is not None:
            return BlockSearch(self.search, render, pad_token_id)
        if self.rain is not None:
            return RAIN(self.rain, render, pad_token_id, question)
        if self.dola_layers is not None:
            return DoLa(self.dola_layers, self.dola_relative_top, self.dola_apply_final_norm)
        if self.genarm is not None:
            return GenARM(self.genarm.reward_model, self.genarm.alpha)
        return None


class ChatMessage(BaseModel):
    # NOTE: extra keys such as `name` are kept out of the template but allowed, as OpenAI and
    # vLLM allow them on messages. `tool_calls` and `tool_call_id` are rendered (server/api/tools.py).
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @model_validator(mode="after")
    def _check_tool_fields(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise ValueError(f"unsupported content part type {part.get('type')!r}")
                parts.append(str(part.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    # Tool calling (server/api/tools.py); an empty list is no tools, as SDKs send it.
    tools: list[ToolDef] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # OpenAI's default: true

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _check_tool_choice(cls, v: Any) -> Any:
        """One 400 naming `tool_choice` for any malformed value (not pydantic's per-branch errors)."""
        if v is None or isinstance(v, str):
            return v
        try:
            return NamedToolChoice.model_validate(v)
        except ValidationError as exc:
            raise ParamError("tool_choice", 'tool_choice must be none, auto, required or '
                                            '{"type": "function", "function": {"name": ...}}') from exc

    @field_validator("tools")
    @classmethod
    def _no_empty_tools(cls, v: list[ToolDef] | None) -> list[ToolDef] | None:
        return v or None

    @model_validator(mode="after")
    def _check_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs requires logprobs=true")
        return self

    def grammar_spec(self) -> GrammarSpec | None:
        """The structured-output spec, or the grammar of a forced tool call (never both)."""
        check_tools(self.tools, self.tool_choice)  # runs first in SamplingFields._check_methods
        spec = super().grammar_spec()
        forced = tool_grammar_spec(self.tools, self.tool_choice, self.parallel_tool_calls is not False) \
            if self.tools else None
        if forced is not None and spec is not None:
            raise ParamError("tool_choice", f"a forced tool call and {spec.param} cannot be combined")
        return forced or spec

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: (Annotated[str, Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
             | list[str] | list[list[int]])  # one-element batches; _check_prompt says why not more
    max_tokens: int | None = Field(16, ge=0)  # 0 (with echo): score the prompt, generate nothing
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _check_echo(self) -> "CompletionRequest":
        if self.echo and self.stream:
            raise ParamError("echo", "echo is supported with non-streamed completions only")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs


# OpenAI fields we do not implement, with the values that ask for nothing (clients and SDKs
# send these defaults); any other value gets a 400 naming the field.
_NOOP_VALUES: dict[str, tuple[Any, ...]] = {
    "functions": (None, []), "function_call": (None, "none"),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "store": (None, False),
    "metadata": (None, {}), "service_tier": (None, "auto", "default"), "web_search_options": (None,),
    "reasoning_effort": (None,), "suffix": (None, ""),
}
MAX_JSON_DEPTH = 64


def parse_body(model: type[BaseModel], raw: bytes) -> BaseModel:
    """Validate a JSON request body; APIError 400 (with `param`) for anything we cannot serve."""
    from server.api.errors import APIError

    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}",
                       None, "invalid_json") from exc
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc.msg} at position {exc.pos}",
                       None, "invalid_json") from exc
    except RecursionError as exc:
        raise APIError(400, "request body is nested too deeply", None, "invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", None, "invalid_json")
    if _depth(data) > MAX_JSON_DEPTH:
        raise APIError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json")
    for key in [k for k in data if k not in model.model_fields]:
        if key in _NOOP_VALUES:
            if data[key] not in _NOOP_VALUES[key]:
                raise APIError(400, f"`{key}` is not supported by this server", key, "unsupported_parameter")
            del data[key]
        else:
            raise APIError(400, f"Unrecognized request argument supplied: {key}", key, "unrecognized_parameter")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        cause = (first.get("ctx") or {}).get("error")
        param = getattr(cause, "param", None) or ".".join(str(p) for p in first.get("loc", ())) or None
        msg = str(cause) if getattr(cause, "param", None) else first.get("msg", "invalid request")
        raise APIError(400, f"invalid value for '{param}': {msg}" if param else msg, param,
                       "invalid_value") from exc


def _depth(value: Any) -> int:
    """Nesting depth, iteratively (deep input must not exhaust our own stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
