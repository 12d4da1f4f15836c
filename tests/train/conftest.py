"""Fixtures for the trainer tests: one tiny random Llama base per session, synthetic data files."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapters.train.data import write_jsonl
from tests.train.tiny import build_base, preference_rows, sft_rows


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models on a shared 2-core machine run ~10x faster on one thread than on two.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base with a different hidden size, for mismatch errors."""
    return build_base(tmp_path_factory.mktemp("tiny") / "other", hidden=32)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "sft.jsonl", sft_rows(64, seed=0))
    write_jsonl(root / "pref_train.jsonl", preference_rows(256, seed=1))
    write_jsonl(root / "pref_eval.jsonl", preference_rows(64, seed=2))
    return root
