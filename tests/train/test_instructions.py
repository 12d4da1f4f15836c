"""The instruction suite: seeded, split by task template, every prompt checkable."""
from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from adapters.train.cli import data_app
from adapters.train.constraints import CONSTRAINTS, EXCLUDE_LETTERS, compatible, describe
from adapters.train.instructions import TOPICS, generate_instructions, split_templates


def test_deterministic_and_distinct() -> None:
    a = generate_instructions(200, seed=3)
    b = generate_instructions(200, seed=3)
    assert a == b
    assert a != generate_instructions(200, seed=4)
    assert len({r.prompt for r in a}) == 200


def test_split_is_by_template_and_seeded() -> None:
    train, heldout = split_templates(seed=0, heldout_frac=0.4)
    assert train and heldout and not train & heldout
    records = generate_instructions(300, seed=0)
    assert {r.template for r in records if r.split == "heldout"} <= heldout
    assert {r.template for r in records if r.split == "train"} <= train
    assert split_templates(seed=1, heldout_frac=0.4) != (train, heldout)


def test_prompts_carry_compatible_constraints_that_the_text_states() -> None:
    records = generate_instructions(500, seed=0)
    seen = set()
    for r in records:
        ids = [c["id"] for c in r.constraints]
        assert 1 <= len(ids) <= 3 and compatible(ids)
        for c in r.constraints:
            assert describe(c["id"], c["args"]) in r.prompt
        seen.update(ids)
    assert seen == set(CONSTRAINTS)  # the suite exercises every checker


def test_topics_avoid_excludable_letters() -> None:
    assert not any(letter in t for t in TOPICS for letter in EXCLUDE_LETTERS)


def test_cli_writes_both_splits(tmp_path: Path) -> None:
    result = CliRunner().invoke(data_app, ["instructions", "--output-dir", str(tmp_path), "--n", "50"])
    assert result.exit_code == 0, result.output
    rows = {s: [json.loads(x) for x in (tmp_path / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "heldout")}
    assert len(rows["train"]) + len(rows["heldout"]) == 50
    assert all({"id", "prompt", "constraints", "template", "split"} <= set(r) for r in rows["train"])
