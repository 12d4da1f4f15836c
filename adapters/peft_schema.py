"""Schemas of the two JSON files an adapter directory carries, and turning their errors into 400s.

In: the decoded JSON of `adapter_config.json` (PEFT) and `alignserve.json` (adapters/train).
Out: frozen pydantic models whose fields have the types the loader relies on (a `task_type` is a
string, `r` a positive integer, every `rank_pattern` key a regex that compiles, ...), or an
`AdapterError` 400 naming the file and field. Unknown fields are kept: PEFT and the trainer write
many this server does not read. Whether a well-typed config is *servable* (DoRA, biases, heads)
is decided in adapters/peft_format.py, not here.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator

from adapters.errors import bad_adapter
from adapters.train.common import ROLE_TASK_TYPES

PositiveInt = Annotated[int, Field(strict=True, gt=0)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
PositiveNumber = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
Schema = TypeVar("Schema", bound=BaseModel)
_MAX_SHOWN = 120  # characters of a field name or value echoed back in a message


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """PEFT's rank/alpha pattern rule (peft.utils.other.get_pattern_key): the pattern ends the path."""
    return re.compile(rf"(.*\.)?({pattern})$")


class PeftHeader(BaseModel):
    """Just enough of any PEFT config to tell LoRA from IA3, prompt tuning, ..."""

    model_config = ConfigDict(extra="allow", frozen=True)
    peft_type: StrictStr = "LORA"


class LoraAdapterConfig(PeftHeader):
    """`adapter_config.json` of a LoRA adapter, as far as serving it depends on the fields.

    NOTE: switches such as `use_dora` stay untyped extras; the loader refuses any truthy one.
    """

    task_type: StrictStr | None = None
    r: PositiveInt = 8
    lora_alpha: Number = 8
    use_rslora: StrictBool | None = None
    rank_pattern: dict[str, PositiveInt] | None = None
    alpha_pattern: dict[str, PositiveNumber] | None = None
    target_modules: list[StrictStr] | StrictStr | None = None
    bias: StrictStr = "none"
    init_lora_weights: StrictBool | StrictStr = True

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns_compile(cls, patterns: dict[str, Any] | None) -> dict[str, Any] | None:
        for pattern in patterns or {}:
            try:
                re.compile(pattern)  # first on its own, so the error's position is the user's
                pattern_regex(pattern)
            except re.error as exc:
                raise ValueError(f"key {_clip(pattern)!r} is not a valid regex ({exc})") from None
        return patterns

    @field_validator("target_modules")
    @classmethod
    def _target_regex_compiles(cls, targets: list[str] | str | None) -> list[str] | str | None:
        if isinstance(targets, str) and targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as exc:
                raise ValueError(f"regex {_clip(targets)!r} is invalid ({exc})") from None
        return targets


class AdapterMetadata(BaseModel):
    """`alignserve.json`, written by adapters/train/common.py `save_adapter`."""

    model_config = ConfigDict(extra="allow", frozen=True)
    role: StrictStr | None = None
    base_fingerprint: dict[str, StrictInt | StrictStr | None] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str | None) -> str | None:
        if role is not None and role not in ROLE_TASK_TYPES:
            raise ValueError(f"unknown role {_clip(role)!r}; expected one of {sorted(ROLE_TASK_TYPES)}")
        return role


def parse(schema: type[Schema], data: Any, shown: str) -> Schema:
    """`data` validated as `schema`; a mismatch is a 400 naming file `shown` and the field."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        field = errors[0]["loc"][0] if errors[0]["loc"] else None
        # A union field reports one error per member ("a valid list", "a valid string"): join them.
        same = [e for e in errors if (e["loc"][0] if e["loc"] else None) == field]
        reasons = "; ".join(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in same))
        got = type(same[0].get("input")).__name__
        where = f"{shown}: {_clip(str(field))}" if field is not None else shown
        raise bad_adapter(f"{where}: {reasons} (got {got})") from None


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."
