"""build_off_main_thread: the server builds its engine in a short-lived thread (see its docstring)."""
from __future__ import annotations

import threading

import pytest

from server.engine.async_engine import build_off_main_thread


def test_returns_what_the_builder_returns_built_in_another_thread():
    seen = {}

    def build():
        seen["thread"] = threading.current_thread()
        return 42

    assert build_off_main_thread(build) == 42
    assert seen["thread"] is not threading.current_thread()
    assert seen["thread"] is not threading.main_thread()


def test_reraises_the_builders_error_in_the_caller():
    def build():
        raise ValueError("bad --lora-modules")

    with pytest.raises(ValueError, match="bad --lora-modules"):
        build_off_main_thread(build)
