"""Load-test configuration: frozen dataclasses and the parsers that build them from CLI strings.

In: strings as typed on the command line (`"64:256"`, `"1,4,16"`, `"name=URL"`).
Out: `LengthSpec`, `Target`, `Level`, `PromptConfig`, `LoadConfig`.
Does not: read env vars, touch the network or build prompts (see `bench.datasets`).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

Endpoint = Literal["chat", "completions"]
PromptSet = Literal["synthetic", "multiturn"]


@dataclass(frozen=True)
class LengthSpec:
    """A token-length distribution: a fixed value or a uniform integer range [low, high]."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> LengthSpec:
        """Parse `"128"` (fixed) or `"64:256"` (uniform, both ends included)."""
        parts = text.strip().split(":")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"bad length {text!r}: use N or LOW:HIGH")
        low, high = int(parts[0]), int(parts[-1])
        if low < 1 or high < low:
            raise ValueError(f"bad length {text!r}: need 1 <= LOW <= HIGH")
        return cls(low, high)

    def sample(self, rng: random.Random) -> int:
        """Draw one length."""
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass(frozen=True)
class Target:
    """One server under test: a display name and its OpenAI base URL (ending in /v1)."""

    name: str
    base_url: str

    @classmethod
    def parse(cls, text: str) -> Target:
        """Parse `name=URL`; a bare URL is named after its host:port."""
        name, sep, url = text.partition("=")
        if not sep or "://" in name:
            url, name = text, ""
        base = normalize_base_url(url)
        return cls(name or (urlsplit(base).netloc or base), base)


def normalize_base_url(url: str) -> str:
    """Strip trailing slashes; a URL with no path gets `/v1` (servers mount the API there)."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"bad URL {url!r}: expected http(s)://host:port[/v1]")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/v1")
    return urlunsplit(parts)


@dataclass(frozen=True)
class Level:
    """One load level: a fixed number of concurrent clients, or a Poisson arrival rate (req/s).

    NOTE: exactly one of `concurrency` / `request_rate` is set; `request_rate` may be inf
    (every request sent at once). `max_concurrency` optionally caps in-flight requests of a
    rate level.
    """

    concurrency: int | None = None
    request_rate: float | None = None
    max_concurrency: int | None = None

    @property
    def label(self) -> str:
        """Short name used in tables, JSON keys and plot ticks."""
        if self.concurrency is not None:
            return f"c={self.concurrency}"
        rate = "inf" if self.request_rate is None or math.isinf(self.request_rate) else f"{self.request_rate:g}"
        cap = f",max={self.max_concurrency}" if self.max_concurrency else ""
        return f"rate={rate}{cap}"


def parse_int_list(text: str) -> tuple[int, ...]:
    """Parse `"1,4,16"` into positive ints."""
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise ValueError(f"bad list {text!r}: need positive integers like 1,4,16")
    return values


def parse_rate_list(text: str) -> tuple[float, ...]:
    """Parse `"2,8,inf"` into positive request rates (req/s)."""
    values = tuple(float(v) for v in text.split(",") if v.strip())
    if not values or min(values) <= 0:
        raise ValueError(f"bad rate {text!r}: need positive numbers or inf")
    return values


def make_levels(concurrency: tuple[int, ...] | None, rates: tuple[float, ...] | None,
                max_concurrency: int | None = None) -> tuple[Level, ...]:
    """Levels for a run: one per request rate when rates are given, else one per concurrency."""
    if rates:
        return tuple(Level(request_rate=r, max_concurrency=max_concurrency) for r in rates)
    return tuple(Level(concurrency=c) for c in (concurrency or (1,)))


@dataclass(frozen=True)
class PromptConfig:
    """What to send: the prompt source and the length distributions.

    `max_tokens`, when set, overrides both `output_len` and a dataset line's own max_tokens.
    """

    prompt_set: PromptSet = "synthetic"
    dataset: Path | None = None
    input_len: LengthSpec = LengthSpec(128, 128)
    output_len: LengthSpec = LengthSpec(128, 128)
    max_tokens: int | None = None
    num_turns: int = 4
    seed: int = 0


@dataclass(frozen=True)
class LoadConfig:
    """A whole load run: targets × levels, each level sending the same `num_requests` prompts.

    Times are seconds except the SLOs, which are milliseconds as typed on the CLI.
    """

    targets: tuple[Target, ...]
    levels: tuple[Level, ...] = (Level(concurrency=1),)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    model: str | None = None
    api_key: str | None = None
    endpoint: Endpoint = "chat"
    num_requests: int = 64
    temperature: float = 0.0
    ignore_eos: bool = False
    warmup: int = 0
    timeout: float = 600.0
    request_timeout: float | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    tokenizer: Path | None = None
    progress: bool = True
