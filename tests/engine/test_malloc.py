"""server.engine.malloc: glibc takes the settings, and a user's MALLOC_* environment wins."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = "from server.engine.malloc import keep_freed_buffers; print(keep_freed_buffers())"


def _probe(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env_extra
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_settings():
    assert _probe({}) == "True"


def test_the_users_environment_wins():
    assert _probe({"MALLOC_TRIM_THRESHOLD_": "131072"}) == "False"
