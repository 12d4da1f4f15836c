"""Shared fixtures: the real default model, a real engine, and a real server subprocess."""
from __future__ import annotations

import os

# NOTE: must precede any triton import (kernels.dispatch pulls it in): on CPU, Triton
# kernels only run under the interpreter, and triton reads this once at import.
os.environ.setdefault("TRITON_INTERPRET", "1")
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from server.models.default_model import ensure_default_model

    return ensure_default_model()


def make_engine(model_dir: Path, **overrides):
    from server.config import CacheConfig, EngineConfig, SchedulerConfig
    from server.engine.engine import LLMEngine

    cache = CacheConfig(block_size=overrides.pop("block_size", 16),
                        num_kv_blocks=overrides.pop("num_kv_blocks", 1024),
                        enable_prefix_caching=overrides.pop("enable_prefix_caching", True))
    sched = SchedulerConfig(max_num_seqs=overrides.pop("max_num_seqs", 64),
                            max_num_batched_tokens=overrides.pop("max_num_batched_tokens", 2048),
                            max_model_len=overrides.pop("max_model_len", 2048),
                            **{k: overrides.pop(k) for k in ("burst_wait_ms", "burst_gap_ms") if k in overrides})
    dtype = overrides.pop("dtype", "float32")
    return LLMEngine(EngineConfig(model=str(model_dir), dtype=dtype, device="cpu",
                                  cache=cache, scheduler=sched, **overrides))


@pytest.fixture(scope="session")
def engine(model_dir):
    return make_engine(model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`alignserve serve` in a subprocess on a free loopback port."""

    def __init__(self, *args: str, api_key: str | None = None) -> None:
        self.port = free_port()
        self.api_key = api_key
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning", *args]
        if "--dtype" not in args:
            # NOTE: `auto` is bf16 on AMX/AVX512-BF16 CPUs and float32 elsewhere; suites that
            # compare against float32 oracles must not depend on the machine they run on.
            cmd += ["--dtype", "float32"]
        self.own_index_root = None
        if "--index-root" not in args:
            # Collections made by a test stay in a directory of its own, never in the user's.
            self.own_index_root = tempfile.mkdtemp(prefix="alignserve-indexes-")
            cmd += ["--index-root", self.own_index_root]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = open(REPO / ".pytest_cache" / f"server-{self.port}.log", "w") if (REPO / ".pytest_cache").is_dir() \
            else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("server did not become healthy in 180 s")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.own_index_root is not None:
            shutil.rmtree(self.own_index_root, ignore_errors=True)


@pytest.fixture(scope="session")
def server(model_dir):
    (REPO / ".pytest_cache").mkdir(exist_ok=True)
    srv = ServerProcess("--num-kv-blocks", "1024", "--max-model-len", "1024", api_key="test-key")
    yield srv
    srv.stop()
