"""Structured outputs: the reply must match a JSON schema, a regex or one of a few choices,
enforced token by token with xgrammar.

A request's `response_format` (OpenAI: `json_object`, `json_schema`) or vLLM's `guided_json`
/ `guided_regex` / `guided_choice` becomes a `GrammarSpec`. The server's `Grammars` (one per
server: an xgrammar compiler over our tokenizer, built on first use) compiles it in the
request's preparing worker thread, never on the engine thread; xgrammar caches compiled
grammars per schema. The result is a `GrammarConstraint`, the request's token constraint
(server/engine/constraints.py): each step it returns xgrammar's packed bitmask of the tokens
the grammar allows next, and the stop tokens only where the grammar may end.

A matcher per output sequence is derived from the sequence's own output tokens: a cached
matcher is advanced by the tokens it has not seen, rolled back after a rewind, forked from
the longest cached prefix for a new sequence (n > 1, best-of candidates, search branches),
so forks, rewinds and preemptions need nothing from the engine.

Why xgrammar and not llguidance (bench/structured_cost.py, SmolLM2's 49,152-token
vocabulary, one core): xgrammar fills a token mask in 1.4-5.7 µs on average (p99 <= 40 µs),
llguidance in 12-77 µs (p99 up to 0.48 ms), and the mask is the part on the engine thread,
once per constrained row per step. llguidance compiles lazily (< 1 ms, against xgrammar's
1-9 ms cold), but compiles run here in the preparing thread and xgrammar caches them per
schema, so that gap costs no step time. xgrammar's Grammar.concat / union also build the
tool-call grammar (server/methods/tool_calls.py) from per-function JSON schemas. Against it:
llguidance keeps forced text to its canonical tokens, and xgrammar 0.2.9 lets length-bounded
strings take raw control characters, which `_tokenizer_info(for_json=True)` works around.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.engine.sequence import Sequence

# Bounds on what a client may ask us to compile (grammar size grows with the source).
MAX_SOURCE_CHARS = 64 * 1024
MAX_CHOICES = 256
# Matchers one request keeps (a search makes many short-lived branches; the oldest go first).
MAX_MATCHERS = 64
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")  # raw control characters but newline
_XGRAMMAR_PREFIX = re.compile(r"^\s*\[[\d:.]+\]\s*\S+:\d+:\s*")  # "[12:00:00] file.cc:123: "


class StructuredError(ValueError):
    """A structured-output request we cannot serve: 400 naming `param`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class JSONSchemaFormat(BaseModel):
    """OpenAI `response_format.json_schema`."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # we always enforce the schema


class ResponseFormat(BaseModel):
    """OpenAI `response_format`: `text` (no constraint), `json_object` or `json_schema`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: str
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> "ResponseFormat":
        if self.type not in ("text", "json_object", "json_schema"):
            raise StructuredError("response_format", f"response_format type {self.type!r} is not supported "
                                                     "(use text, json_object or json_schema)")
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise StructuredError("response_format", "json_schema is required with type json_schema, and only there")
        return self


@dataclass(frozen=True)
class GrammarSpec:
    """What the reply must match: kind "json" (a schema; None: any JSON object), "regex",
    "choice" or "tool_calls" (((name, parameters schema), ...), parallel) from
    server/api/tools.py; `param` is the request field it came from (for errors)."""

    kind: str  # also "ebnf": an xgrammar EBNF grammar (vLLM's guided_grammar)
    source: Any
    param: str


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` field: one of json / regex / choice / grammar (xgrammar's
    EBNF) / json_object; a key vLLM has and we do not (structural_tag, whitespace_pattern)
    is a 400 naming it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, min_length=1)
    json_object: bool | None = None


def grammar_spec(response_format: ResponseFormat | None, guided_json: dict | str | None,
                 guided_regex: str | None, guided_choice: list[str] | None, guided_grammar: str | None = None,
                 structured_outputs: StructuredOutputs | None = None) -> GrammarSpec | None:
    """The request's one structured-output spec (None: free text); StructuredError if several.
    vLLM's `structured_outputs` keys are read as the guided_* fields of the same name."""
    specs = []
    if structured_outputs is not None:
        so = structured_outputs
        given = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(so, k) not in (None, False)]
        if len(given) != 1:
            raise StructuredError("structured_outputs", "structured_outputs takes exactly one of json, regex, "
                                                        "choice, grammar, json_object")
        try:
            inner = grammar_spec(None, so.json_, so.regex, so.choice, so.grammar)
        except StructuredError as exc:
            raise StructuredError("structured_outputs", str(exc)) from exc
        specs.append(GrammarSpec(inner.kind, inner.source, "structured_outputs") if inner is not None
                     else GrammarSpec("json", None, "structured_outputs"))
    if guided_grammar is not None:
        if not guided_grammar.strip():
            raise StructuredError("guided_grammar", "guided_grammar must be a non-empty EBNF grammar")
        specs.append(GrammarSpec("ebnf", guided_grammar, "guided_grammar"))
    if response_format is not None and response_format.type == "json_object":
        specs.append(GrammarSpec("json", None, "response_format"))
    elif response_format is not None and response_format.type == "json_schema":
        specs.append(GrammarSpec("json", response_format.json_schema.schema_, "response_format"))
    if guided_json is not None:
        if isinstance(guided_json, str):
            try:
                guided_json = json.loads(guided_json)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise StructuredError("guided_json", f"guided_json is not valid JSON: {exc}") from exc
        if not isinstance(guided_json, dict):
            raise StructuredError("guided_json", "guided_json must be a JSON schema object")
        specs.append(GrammarSpec("json", guided_json, "guided_json"))
    if guided_regex is not None:
        specs.append(GrammarSpec("regex", guided_regex, "guided_regex"))
    if guided_choice is not None:
        if not 1 <= len(guided_choice) <= MAX_CHOICES or any(c == "" for c in guided_choice):
            raise StructuredError("guided_choice", f"guided_choice needs 1 to {MAX_CHOICES} non-empty strings")
        specs.append(GrammarSpec("choice", tuple(guided_choice), "guided_choice"))
    if len(specs) > 1:
        raise StructuredError(specs[1].param, f"{specs[0].param} and {specs[1].param} cannot be combined")
    return specs[0] if specs else None


def check_schema(schema: dict, param: str) -> None:
    """A schema must be valid JSON Schema (its own meta-schema) before xgrammar sees it:
    xgrammar ignores some keywords it does not know, jsonschema names what is wrong."""
    import jsonschema

    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        path = "/".join(str(p) for p in exc.path)
        raise StructuredError(param, f"invalid JSON schema{f' at {path}' if path else ''}: {exc.message}") from exc
    except Exception as exc:  # e.g. an unhashable $schema: any failure here is the client's schema
        raise StructuredError(param, f"invalid JSON schema: {exc}") from exc


class Grammars:
    """One per server: the xgrammar compiler over our tokenizer (built on first use, under a
    lock: preparing threads race for it) and what every request's constraint shares."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids, max_threads: int = 2) -> None:
        self.hf = hf_tokenizer
        self.vocab_size = vocab_size  # the model's (logits width); may exceed the tokenizer's
        self.stop_token_ids = sorted(set(int(t) for t in stop_token_ids))
        self.max_threads = max_threads
        self._compilers: dict[bool, Any] = {}  # for_json -> compiler
        self._lock = threading.Lock()

    @classmethod
    def for_engine(cls, engine) -> "Grammars":
        return cls(engine.tokenizer.hf, engine.model_config.vocab_size, engine.eos_token_ids)

    def compiler(self, for_json: bool = False):
        """The compiler for JSON grammars (schemas, tool calls) or for the others (regex,
        choice); each is built on first use."""
        with self._lock:
            if for_json not in self._compilers:
                import xgrammar as xgr

                # 256 MiB of compiled grammars at most; the oldest are dropped past it.
                self._compilers[for_json] = xgr.GrammarCompiler(
                    self._tokenizer_info(for_json), max_threads=self.max_threads, cache_limit_bytes=256 << 20)
            return self._compilers[for_json]

    def _tokenizer_info(self, for_json: bool = False):
        """xgrammar's view of the vocabulary, with every special token but the stop tokens
        blanked: xgrammar reads a special token's text (`<|im_start|>`) as characters a JSON
        string may hold, but our detokenizer drops it, so the text would not match the grammar.
        `for_json`: tokens holding a raw control character other than newline are blanked
        too. NOTE: xgrammar 0.2.9 lets a length-bounded JSON string (minLength / maxLength)
        take raw control characters (a tab, NUL), which JSON forbids; JSON without free
        whitespace never needs one outside a string, and a tool call needs only newlines."""
        import xgrammar as xgr

        base = xgr.TokenizerInfo.from_huggingface(self.hf, vocab_size=self.vocab_size,
                                                  stop_token_ids=self.stop_token_ids)
        encoded = [""] * self.vocab_size
        for token, idx in self.hf.get_vocab().items():
            if idx < self.vocab_size:
                encoded[idx] = token
        special = set(self.hf.all_special_ids) | {i for i, t in self.hf.added_tokens_decoder.items() if t.special}
        for idx in special - set(self.stop_token_ids):
            if idx < self.vocab_size:
                encoded[idx] = ""  # xgrammar never allows an empty token
        for idx in range(min(len(self.hf), self.vocab_size)) if for_json else ():
            if encoded[idx] and idx not in self.stop_token_ids and _CONTROL.search(self.hf.decode([idx])):
                encoded[idx] = ""
        return xgr.TokenizerInfo(encoded, base.vocab_type, vocab_size=self.vocab_size,
                                 stop_token_ids=self.stop_token_ids, add_prefix_space=base.add_prefix_space)

    def compile(self, spec: GrammarSpec):
        """xgrammar's CompiledGrammar for `spec` (blocking: call it off the engine thread).
        StructuredError for anything that does not compile."""
        if spec.kind == "json" and spec.source is not None:
            check_schema(spec.source, spec.param)
        if spec.kind == "tool_calls":
            return self._compile_tool_calls(spec)
        source = self._source(spec)
        if len(source) > MAX_SOURCE_CHARS:
            raise StructuredError(spec.param, f"{spec.param} is too large ({len(source)} characters; "
                                              f"at most {MAX_SOURCE_CHARS})")
        compiler = self.compiler(for_json=spec.kind == "json")
        try:
            if spec.kind == "json":
                # NOTE: no free whitespace: a small model given room for it may loop on spaces or
                # newlines until max_tokens; separators are ", " and ": ". json_object is any
                # object (strict_mode off: additional properties allowed).
                return compiler.compile_json_schema(source, any_whitespace=False, strict_mode=spec.source is not None)
            if spec.kind == "regex":
                return compiler.compile_regex(source)
            return compiler.compile_grammar(source)
        except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own types
            message = _XGRAMMAR_PREFIX.sub("", str(exc)).strip() or type(exc).__name__
            raise StructuredError(spec.param, f"cannot compile {spec.param}: {message}") from exc

    def _compile_tool_calls(self, spec: GrammarSpec):
        """`tool_choice` required / named: Hermes call blocks over the offered functions
        (server/methods/tool_calls.py); their schemas were checked with the request."""
        from server.methods.tool_calls import tool_call_grammar

        functions, parallel = spec.source
        size = len(json.dumps(functions))
        if size > MAX_SOURCE_CHARS:
            raise StructuredError("tools", f"the tools' parameter schemas are too large ({size} characters; "
                                           f"at most {MAX_SOURCE_CHARS})")
        try:
            return self.compiler(for_json=True).compile_grammar(tool_call_grammar(list(functions), parallel))
        except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own types
            message = _XGRAMMAR_PREFIX.sub("", str(exc)).strip() or type(exc).__name__
            raise StructuredError("tools", f"cannot compile the tools' parameter schemas: {message}") from exc

    @staticmethod
    def _source(spec: GrammarSpec) -> str:
        if spec.kind == "json":
            return json.dumps(spec.source if spec.source is not None else {"type": "object"})
        if spec.kind in ("regex", "ebnf"):
            return spec.source
        # JSON string escapes are xgrammar EBNF string-literal escapes too.
        return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=True) for c in spec.source)

    def constraint(self, spec: GrammarSpec) -> "GrammarConstraint":
        return GrammarConstraint(self.compile(spec), self.vocab_size, self.stop_token_ids)


class GrammarConstraint:
    """A request's grammar as a token constraint (one instance per request, engine thread only)."""

    def __init__(self, compiled, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.compiled = compiled
        self.words = (vocab_size + 31) // 32
        self.stop_token_ids = list(stop_token_ids)
        # seq_id -> (the output tokens its matcher has accepted, matcher; None: off the grammar)
        self._state: OrderedDict[int, tuple[list[int], Any]] = OrderedDict()
        self.num_fresh = self.num_forked = 0  # matchers made from scratch / forked (tests read them)

    def allowed_tokens(self, seq: Sequence) -> torch.Tensor | list[int] | None:
        matcher = self.matcher(seq.seq_id, seq.output_token_ids)
        if matcher is None or matcher.is_terminated():
            # Off the grammar (a token it rejects was forced in) or past its end: only ending is left.
            return self.stop_token_ids
        mask = torch.empty(self.words, dtype=torch.int32)
        return mask if matcher.fill_next_token_bitmask(mask) else None

    def matcher(self, key: int, out: list[int]):
        """The matcher that has accepted exactly `out` (None if `out` leaves the grammar)."""
        entry = self._state.pop(key, None)
        if entry is None:
            entry = self._nearest(out)
        tokens, m = entry
        same = _common_prefix(tokens, out)
        if m is None and same == len(tokens) and tokens:
            self._keep(key, list(out), None)  # it left the grammar and still has those tokens
            return None
        if m is not None and same < len(tokens):
            m.rollback(len(tokens) - same)  # a rewind (or another branch's history)
        if m is None:
            m, same = self._fresh(), 0
        for t in out[same:]:
            if not m.accept_token(t):
                m = None
                break
        self._keep(key, list(out), m)
        return m

    def _nearest(self, out: list[int]) -> tuple[list[int], Any]:
        """A fork of the cached matcher whose tokens are the longest prefix of `out`: a new
        sequence is usually a fork of one we have seen (its parent, or the branch it continues)."""
        best = None
        for tokens, m in self._state.values():
            if m is not None and len(tokens) <= len(out) and out[:len(tokens)] == tokens:
                if best is None or len(tokens) > len(best[0]):
                    best = (tokens, m)
        if best is None:
            return [], self._fresh()
        self.num_forked += 1
        return list(best[0]), best[1].fork()

    def _fresh(self):
        import xgrammar as xgr

        self.num_fresh += 1
        return xgr.GrammarMatcher(self.compiled)

    def _keep(self, key: int, tokens: list[int], m) -> None:
        self._state[key] = (tokens, m)
        while len(self._state) > MAX_MATCHERS:
            self._state.popitem(last=False)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i
