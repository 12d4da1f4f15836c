"""Prompt sets: synthetic lengths (words and a real tokenizer), multi-turn chats, JSONL files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.config import LengthSpec, PromptConfig, Target
from bench.datasets import build_workload, render_prompt
from bench.tokens import WORDS, TokenCounter


def word_level_tokenizer(path: Path) -> Path:
    """A tiny real HF tokenizer (one token per known word) saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", *sorted(set(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


def test_length_spec_parsing() -> None:
    assert LengthSpec.parse("128") == LengthSpec(128, 128)
    assert LengthSpec.parse("64:256") == LengthSpec(64, 256)
    for bad in ("0", "9:3", "a", "1:2:3", "-4"):
        with pytest.raises(ValueError):
            LengthSpec.parse(bad)


def test_target_parsing_adds_v1() -> None:
    assert Target.parse("http://127.0.0.1:8000") == Target("127.0.0.1:8000", "http://127.0.0.1:8000/v1")
    assert Target.parse("ours=http://h:1/v1/") == Target("ours", "http://h:1/v1")
    with pytest.raises(ValueError):
        Target.parse("name=localhost:8000")


@pytest.mark.parametrize("spec", [LengthSpec(32, 32), LengthSpec(10, 50)])
def test_synthetic_lengths_without_tokenizer(spec: LengthSpec) -> None:
    counter = TokenCounter()
    sessions = build_workload(PromptConfig(input_len=spec, output_len=LengthSpec(5, 9), seed=3), 20, counter)
    assert len(sessions) == 20 and all(len(s.turns) == 1 for s in sessions)
    for s in sessions:
        turn = s.turns[0]
        assert spec.low <= len(turn.messages[0]["content"].split()) == turn.input_len <= spec.high
        assert 5 <= turn.max_tokens <= 9
    again = build_workload(PromptConfig(input_len=spec, output_len=LengthSpec(5, 9), seed=3), 20, counter)
    other = build_workload(PromptConfig(input_len=spec, output_len=LengthSpec(5, 9), seed=4), 20, counter)
    assert again == sessions and other != sessions


def test_synthetic_lengths_exact_with_tokenizer(tmp_path: Path) -> None:
    counter = TokenCounter.load(word_level_tokenizer(tmp_path))
    assert counter.is_exact
    sessions = build_workload(PromptConfig(input_len=LengthSpec(20, 40), max_tokens=7), 10, counter)
    for s in sessions:
        turn = s.turns[0]
        assert counter.count(turn.messages[0]["content"]) == turn.input_len
        assert 20 <= turn.input_len <= 40 and turn.max_tokens == 7


def test_multiturn_conversations() -> None:
    cfg = PromptConfig(prompt_set="multiturn", num_turns=4, input_len=LengthSpec(40, 40),
                       output_len=LengthSpec(30, 30))
    sessions = build_workload(cfg, 10, TokenCounter())
    assert [len(s.turns) for s in sessions] == [4, 4, 2]
    for turn in (t for s in sessions for t in s.turns):
        assert turn.messages[0]["role"] == "user" and turn.messages[0]["content"].strip()
        assert 40 <= turn.input_len <= 60 and turn.max_tokens == 30
        assert len(turn.fallback_reply.split()) >= 20


def test_jsonl_dataset(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "hello there"},
            {"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "hi"}], "max_tokens": 5}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cfg = PromptConfig(dataset=path, output_len=LengthSpec(9, 9))
    sessions = build_workload(cfg, 5, TokenCounter())  # fewer lines than requests: cycled
    turns = [s.turns[0] for s in sessions]
    assert len(turns) == 5
    by_len = {len(t.messages): t for t in turns}
    assert by_len[1].messages[0] == {"role": "user", "content": "hello there"}
    assert by_len[1].max_tokens == 9 and by_len[2].max_tokens == 5
    assert by_len[2].input_len == 3
    fixed = build_workload(PromptConfig(dataset=path, max_tokens=2), 2, TokenCounter())
    assert all(s.turns[0].max_tokens == 2 for s in fixed)


@pytest.mark.parametrize("line", ['{"text": "x"}', "not json", '{"prompt": "x", "max_tokens": 0}',
                                  '{"messages": []}'])
def test_jsonl_bad_line_names_it(tmp_path: Path, line: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        build_workload(PromptConfig(dataset=path), 1, TokenCounter())


def test_render_prompt() -> None:
    assert render_prompt([{"role": "user", "content": "hi"}]) == "hi"
    text = render_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}])
    assert text == "User: a\nAssistant: b\nUser: c\nAssistant:"
