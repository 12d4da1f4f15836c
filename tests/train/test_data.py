"""Input validation: errors name line numbers and fire before any model is loaded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.train.data import DataError, load_preferences, load_sft, read_jsonl


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_lines_are_reported_with_numbers(tmp_path: Path) -> None:
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path = write(tmp_path / "x.jsonl", [good, "{not json", "", good, "[1, 2]"])
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    message = str(err.value)
    assert "line 2: malformed JSON" in message and "line 5: expected a JSON object" in message
    assert "line 1" not in message and "2 bad line(s)" in message


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="contains no records"):
        read_jsonl(write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_preference_field_errors(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "a"},
            {"chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "", "rejected": "b"},
            {"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}]
    path = write(tmp_path / "p.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(DataError) as err:
        load_preferences(path)
    message = str(err.value)
    for expected in ("line 2: missing field 'rejected'", "line 3: missing field 'prompt'",
                     "line 4: 'chosen' and 'rejected' are identical", "line 5: 'chosen' is empty",
                     "line 6: 'prompt[0]' has role 'robot'"):
        assert expected in message
    assert "line 1:" not in message


def test_preferences_become_conversational(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", [json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "extra": 1})])
    assert load_preferences(path) == [{"prompt": [{"role": "user", "content": "q"}],
                                       "chosen": [{"role": "assistant", "content": "a"}],
                                       "rejected": [{"role": "assistant", "content": "b"}]}]


def test_sft_one_example_per_assistant_turn(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                {"role": "assistant", "content": "a2"}]
    path = write(tmp_path / "s.jsonl", [json.dumps({"messages": messages}),
                                        json.dumps({"prompt": "u", "completion": "c"})])
    examples = load_sft(path)
    assert [e["completion"][0]["content"] for e in examples] == ["a1", "a2", "c"]
    assert examples[1]["prompt"] == messages[:4]


def test_sft_errors(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "u"}]},
            {"messages": [{"role": "assistant", "content": "a"}]},
            {"text": "x"},
            {"messages": "not a list"}]
    with pytest.raises(DataError) as err:
        load_sft(write(tmp_path / "s.jsonl", [json.dumps(r) for r in rows]))
    message = str(err.value)
    for expected in ("line 1: no assistant message", "line 2: the first assistant message has no user",
                     "line 3: missing field 'messages'", "line 4: 'messages' must be a non-empty list"):
        assert expected in message
