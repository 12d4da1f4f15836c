"""Preference building against a scripted OpenAI-compatible server."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from adapters.train.data import DataError, load_preferences, write_jsonl
from adapters.train.preferences import (SamplingConfig, build_preferences, evaluate_pass_rate,
                                        load_instructions, pick_pair)
from tests.train.fake_openai import FakeOpenAI

NO_COMMAS = [{"id": "punctuation:no_commas", "args": {}}]
TWO = NO_COMMAS + [{"id": "case:lower", "args": {}}]


def test_pick_pair_best_vs_worst_first_sampled_wins_ties() -> None:
    responses = ["Bad, one", "good one", "Bad, two", "also good", "Half ok"]
    pair = pick_pair(responses, TWO)
    assert pair is not None
    assert (pair["chosen"], pair["rejected"]) == ("good one", "Bad, one")
    assert (pair["chosen_score"], pair["rejected_score"]) == (1.0, 0.0)
    assert pair["scores"] == [0.0, 1.0, 0.0, 1.0, 0.5]


def test_pick_pair_needs_contrast_and_text() -> None:
    assert pick_pair(["a b", "c d"], NO_COMMAS) is None
    assert pick_pair(["a, b", "   "], NO_COMMAS) is None


def records(n: int) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"prompt {i}", "constraints": NO_COMMAS} for i in range(n)]


def test_build_preferences_with_n(tmp_path: Path) -> None:
    def chat(body: dict) -> list[tuple[str, str]]:
        if body["messages"][0]["content"] == "prompt 2":  # no contrast: no pair
            return [("x y", "stop")] * body["n"]
        return [("a, b", "stop"), ("a b", "stop"), ("c d", "stop"), ("c, d", "stop")][:body["n"]]

    fake = FakeOpenAI(chat=chat)
    cfg = SamplingConfig(server="http://fake/v1", n=4, seed=7, concurrency=2)
    rows, stats = asyncio.run(build_preferences(records(3), cfg, http_client=fake.client()))
    assert [(r["id"], r["chosen"], r["rejected"]) for r in rows] == [("r0", "a b", "a, b"), ("r1", "a b", "a, b")]
    assert stats["pairs"] == 2 and stats["responses"] == 12 and stats["model"] == "fake-model"
    chat_bodies = [b for p, b in fake.requests if p.endswith("/chat/completions")]
    assert sorted(b["seed"] for b in chat_bodies) == [7, 1007, 2007]
    assert all(b["n"] == 4 and b["model"] == "fake-model" for b in chat_bodies)
    write_jsonl(tmp_path / "p.jsonl", rows)
    assert len(load_preferences(tmp_path / "p.jsonl")) == 2  # the trainers accept the output


def test_falls_back_to_single_requests_when_n_is_rejected() -> None:
    fake = FakeOpenAI(chat=lambda body: [("a, b" if body["seed"] % 2 else "a b", "stop")], reject_n=True)
    cfg = SamplingConfig(server="http://fake/v1", model="m", n=3, seed=10)
    rows, _ = asyncio.run(build_preferences(records(1), cfg, http_client=fake.client()))
    assert rows[0]["scores"] == [1.0, 0.0, 1.0]
    singles = [b["seed"] for p, b in fake.requests if p.endswith("/chat/completions") and b["n"] == 1]
    assert singles == [10, 11, 12]


def test_evaluate_pass_rate() -> None:
    fake = FakeOpenAI(chat=lambda body: [("ok" if body["messages"][0]["content"] != "prompt 0" else "no, ok", "stop")])
    cfg = SamplingConfig(server="http://fake/v1", model="adapter-x", temperature=0.0)
    result = asyncio.run(evaluate_pass_rate(records(4), cfg, http_client=fake.client()))
    assert (result["passed"], result["pass_rate"], result["model"]) == (3, 0.75, "adapter-x")


def test_load_instructions_reports_lines(tmp_path: Path) -> None:
    path = tmp_path / "i.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"prompt": "p", "constraints": []}, {"prompt": "p"},
                                                      {"constraints": []}]) + "\n")
    with pytest.raises(DataError, match=r"line 2: missing 'constraints'(.|\n)*line 3: missing or empty 'prompt'"):
        load_instructions(str(path))
