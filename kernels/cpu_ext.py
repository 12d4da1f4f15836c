"""Our C++ CPU kernels (kernels/csrc), compiled on first use for this machine's CPU.

`load()` builds them once per machine with torch's cpp_extension (-O3 -march=native, so the
build cache is keyed by the CPU's flags: a cache made on an AMX host is never loaded on an
AVX2 one) and returns the module, or None where there is no compiler; callers then keep their
torch route. `ALIGNSERVE_CPU_KERNELS=0` turns them off. Today: `paged_decode_attention` and `paged_prefill_attention`
(kernels.paged_attention_cpu), the fused decoder ops `rms_norm`, `silu_and_mul`, `rotary_and_cache` (kernels.fused)
the gathered multi-LoRA `lora_bgmv` (kernels.lora) and `DecoderStack`, a decode step's layers in
one call (server.models.cpu_stack).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "module.cpp", CSRC / "paged_decode_cpu.cpp", CSRC / "paged_prefill_cpu.cpp",
           CSRC / "fused_cpu.cpp", CSRC / "lora_cpu.cpp", CSRC / "decoder_cpu.cpp",
           CSRC / "gemv_cpu.cpp", CSRC / "amx_cpu.cpp")
HEADERS = (CSRC / "cpu_common.h", CSRC / "ops.h")  # not compiled alone, but part of what the build name hashes
# -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers, compiled into our .so;
# without it the kernel runs on one thread. The soname is libgomp.so.1 either way, so the
# process keeps the one OpenMP runtime torch loaded.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-strict-aliasing", "-fno-math-errno")
LDFLAGS = ("-fopenmp",)


def enabled() -> bool:
    return os.environ.get("ALIGNSERVE_CPU_KERNELS", "1") != "0"


def _build_name() -> str:
    from server.models.linear import cpu_flags

    digest = hashlib.sha1(" ".join([*sorted(cpu_flags()), *CFLAGS, *LDFLAGS]).encode())
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    return f"alignserve_cpu_{digest.hexdigest()[:12]}"


def kernels_for(x: torch.Tensor, backend: str) -> ModuleType | None:
    """The module where an op over `x` should use it, else None (take the torch twin): only
    under the "auto" backend ("torch" forces the twins, the oracle route), on CPU, in float32
    or 16 bits (float64 is the oracle tests' dtype)."""
    if backend != "auto" or not x.is_cpu or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    return load()


def decode_kernel_for(dtype: torch.dtype) -> ModuleType | None:
    """The module where decode attention over a `dtype` KV cache should use it, else None.

    Only 16-bit caches: there it is 3-5x the torch route (AVX512-BF16 EPYC, batch 16-64 x 200
    keys); over float32 caches CPU SDPA is as fast, and float64 (oracle tests) stays in torch.
    """
    return load() if dtype in (torch.bfloat16, torch.float16) else None


@functools.lru_cache(maxsize=None)
def prefill_kernel_for(dtype: torch.dtype) -> ModuleType | None:
    """The module where multi-query (prefill) attention over a `dtype` KV cache should use it.

    Only where oneDNN multiplies `dtype` in packed AMX tiles (bf16 on AMX CPUs): the kernel is
    built on its brgemm. Elsewhere (AVX2, AVX512-BF16 without AMX, float32, fp16) SDPA stays.
    """
    module = load() if dtype == torch.bfloat16 else None
    return module if module is not None and module.paged_prefill_supported(dtype) else None


@functools.lru_cache(maxsize=1)
def load() -> ModuleType | None:
    """The compiled module, or None (disabled, or no working compiler: logged once)."""
    if not enabled():
        return None
    from torch.utils import cpp_extension

    # The venv's own ninja (a dependency) when PATH does not hold the venv's bin.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    try:
        return cpp_extension.load(
            name=_build_name(), sources=[str(s) for s in SOURCES],
            extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), verbose=False)
    except Exception as exc:  # no compiler / ninja: the torch route stays correct, only slower
        logger.warning("CPU kernels unavailable, using the torch route: %s", str(exc).splitlines()[0])
        return None


if __name__ == "__main__":  # `python -m kernels.cpu_ext`: build now (make model does), not at first use
    logging.basicConfig(level=logging.INFO)
    module = load()
    print(f"CPU kernels: {module.__file__ if module is not None else 'unavailable (torch route)'}")
