"""JSONL in and out for the trainer, with validation that runs before any model is loaded.

In: a JSONL path. Out: examples normalised to TRL's *conversational* formats, so training applies
the base model's chat template exactly as the server does:
- SFT: `{"prompt": [messages], "completion": [assistant message]}`, one example per assistant turn
  (loss on that turn only), from `{"messages": [...]}` or `{"prompt": str, "completion": str}`;
- preferences: `{"prompt": [messages], "chosen": [assistant msg], "rejected": [assistant msg]}`
  from `{"prompt": str | messages, "chosen": str | [msg], "rejected": str | [msg]}`.
Every problem is reported with its line number, all at once (up to a cap), as a `DataError`.
Tokenising is the trainers' job.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

Message = dict[str, str]
ROLES = frozenset({"system", "user", "assistant"})
MAX_REPORTED_ERRORS = 20


class DataError(ValueError):
    """Bad training data; the message lists the offending lines."""


def _raise_if_errors(path: Path, errors: list[str]) -> None:
    if not errors:
        return
    shown = errors[:MAX_REPORTED_ERRORS]
    more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    raise DataError(f"{path}: {len(errors)} bad line(s):\n  " + "\n  ".join(shown) + more)


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Parse a JSONL file into (line number, object) pairs; blank lines are skipped.

    Raises:
        DataError: missing file, malformed JSON or non-object lines (with line numbers), no records.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows: list[tuple[int, dict[str, Any]]] = []
    errors: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"line {lineno}: malformed JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                errors.append(f"line {lineno}: expected a JSON object, got {type(obj).__name__}")
                continue
            rows.append((lineno, obj))
    _raise_if_errors(path, errors)
    if not rows:
        raise DataError(f"{path}: contains no records")
    return rows


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows as JSONL (UTF-8, one object per line); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (recorded in adapter metadata)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _messages(value: Any, field: str) -> list[Message]:
    """Validate a chat-messages list; raises ValueError with a short reason."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{field}' must be a non-empty list of messages")
    out: list[Message] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise ValueError(f"'{field}[{i}]' must be an object with a string 'content'")
        if msg.get("role") not in ROLES:
            raise ValueError(f"'{field}[{i}]' has role {msg.get('role')!r}, expected one of {sorted(ROLES)}")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _text(row: Mapping[str, Any], field: str) -> str:
    value = row.get(field)
    if field not in row:
        raise ValueError(f"missing field '{field}'")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{field}' must be a non-empty string")
    return value


def _sft_examples(row: Mapping[str, Any]) -> list[dict[str, list[Message]]]:
    if "messages" in row:
        messages = _messages(row["messages"], "messages")
    elif "prompt" in row or "completion" in row:
        messages = [{"role": "user", "content": _text(row, "prompt")},
                    {"role": "assistant", "content": _text(row, "completion")}]
    else:
        raise ValueError("missing field 'messages' (or 'prompt' + 'completion')")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError("no assistant message to train on")
    if turns[0] == 0 or all(m["role"] == "system" for m in messages[:turns[0]]):
        raise ValueError("the first assistant message has no user message before it")
    if not all(messages[i]["content"].strip() for i in turns):
        raise ValueError("an assistant message is empty")
    return [{"prompt": messages[:i], "completion": [messages[i]]} for i in turns]


def _response(row: Mapping[str, Any], field: str) -> list[Message]:
    if field not in row:
        raise ValueError(f"missing field '{field}'")
    value = row[field]
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"'{field}' is empty")
        return [{"role": "assistant", "content": value}]
    msgs = _messages(value, field)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise ValueError(f"'{field}' must be a string or a single assistant message")
    return msgs


def _preference_example(row: Mapping[str, Any]) -> dict[str, list[Message]]:
    if "prompt" not in row:
        raise ValueError("missing field 'prompt'")
    prompt_value = row["prompt"]
    prompt = ([{"role": "user", "content": _text(row, "prompt")}] if isinstance(prompt_value, str)
              else _messages(prompt_value, "prompt"))
    chosen, rejected = _response(row, "chosen"), _response(row, "rejected")
    if chosen[0]["content"] == rejected[0]["content"]:
        raise ValueError("'chosen' and 'rejected' are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def load_sft(path: str | Path) -> list[dict[str, list[Message]]]:
    """Load SFT data as conversational prompt/completion examples (see module docstring)."""
    examples: list[dict[str, list[Message]]] = []
    errors: list[str] = []
    for lineno, row in read_jsonl(path):
        try:
            examples.extend(_sft_examples(row))
        except ValueError as exc:
            errors.append(f"line {lineno}: {exc}")
    _raise_if_errors(Path(path), errors)
    return examples


def load_preferences(path: str | Path) -> list[dict[str, list[Message]]]:
    """Load preference pairs as conversational prompt/chosen/rejected examples."""
    examples: list[dict[str, list[Message]]] = []
    errors: list[str] = []
    for lineno, row in read_jsonl(path):
        try:
            examples.append(_preference_example(row))
        except ValueError as exc:
            errors.append(f"line {lineno}: {exc}")
    _raise_if_errors(Path(path), errors)
    return examples
