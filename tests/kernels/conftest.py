"""Kernel tests run Triton under its CPU interpreter; this must happen before any triton import."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator

# NOTE: triton decides interpreter vs compiler when triton itself and each kernel module are
# imported, so a test module elsewhere that imports triton first (e.g. via kernels.dispatch)
# leaves the kernels uncallable on CPU. `pytest tests/kernels` always works; a whole-suite
# run needs the same setdefault at the top of tests/conftest.py.
_IMPORTED_TOO_EARLY = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter_active() -> None:
    if _IMPORTED_TOO_EARLY:
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: add "
                    "os.environ.setdefault('TRITON_INTERPRET', '1') at the top of "
                    "tests/conftest.py, or run `pytest tests/kernels` on its own")


@pytest.fixture(autouse=True)
def _single_torch_thread() -> Iterator[None]:
    """Run kernel tests on one intra-op thread, restored afterwards.

    The interpreter and oracles issue thousands of tiny torch ops; on a small shared machine
    the thread pool's wake-ups cost far more than they save (100x on the float64 oracle).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ext():
    """Our compiled CPU kernels (kernels/csrc), for the tests that call them directly."""
    from kernels import cpu_ext

    if not cpu_ext.enabled():
        pytest.skip("ALIGNSERVE_CPU_KERNELS=0")
    module = cpu_ext.load()
    # Every machine we run on has a compiler: a build that fails here must not pass silently
    # as the (slower) torch route.
    assert module is not None, "the CPU kernels did not build (see the warning logged above)"
    return module
