"""OpenAI wire format: pydantic request models (validated) and response builders."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.engine.sequence import SamplingParams

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_N = 16
MAX_BEST_OF = 32


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenARMOptions(BaseModel):
    """`genarm`: guide decoding with an autoregressive reward model adapter."""

    model_config = ConfigDict(extra="forbid")

    reward_model: str
    alpha: float = Field(1.0, ge=0.0, le=100.0)  # = 1 / beta


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions (OpenAI + vLLM extensions)."""

    model_config = ConfigDict(extra="allow")

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

    @model_validator(mode="after")
    def _check_methods(self) -> "SamplingFields":
        if self.best_of is not None:
            if self.best_of < self.n:
                raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
            if self.stream:
                raise ValueError("best_of cannot be streamed: candidates are ranked after they finish")
        if self.reward_model is not None and self.best_of is None:
            raise ValueError("reward_model scores best_of candidates; set best_of too")
        if self.dola_layers is not None and self.genarm is not None:
            raise ValueError("dola_layers and genarm cannot be combined in one request")
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
            logprobs=logprobs,
        )

    def logit_method(self):
        """A fresh per-request LogitMethod for the options set (None: plain decoding)."""
        from server.methods.dola import DoLa
        from server.methods.genarm import GenARM

        if self.dola_layers is not None:
            return DoLa(self.dola_layers, self.dola_relative_top, self.dola_apply_final_norm)
        if self.genarm is not None:
            return GenARM(self.genarm.reward_model, self.genarm.alpha)
        return None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

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

    @model_validator(mode="after")
    def _check_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
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

    @field_validator("echo")
    @classmethod
    def _check_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
