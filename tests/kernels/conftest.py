"""Kernel tests run Triton under its CPU interpreter; this must happen before any triton import."""
from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

# NOTE: triton.jit decides interpreter vs compiler when a kernel module is imported. If a
# test elsewhere imported our kernels before this conftest ran, re-import them so their
# kernels are interpreted (dependencies first).
_KERNEL_MODULES = (
    "kernels.paged_attention_decode",
    "kernels.paged_attention",
    "kernels.reshape_and_cache",
    "kernels.lora",
    "kernels.dispatch",
)
if os.environ["TRITON_INTERPRET"] == "1":
    for _name in _KERNEL_MODULES:
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])
