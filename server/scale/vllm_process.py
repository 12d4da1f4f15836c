"""vLLM's OpenAI server as a child process on loopback: which interpreter, which flags, start/stop.

In: `VLLMOptions` (what `alignserve serve --backend vllm` was given). Out: a running
`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 that only our app talks to.
The interpreter is ours when it can import vLLM (`pip install 'alignserve[vllm]'`), else the
separate virtualenv `make vllm` fills (`.peers/vllm`: vLLM's CPU wheel, which pins its own
torch and companions and must not share our venv). Does not: translate requests (vllm_client.py).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
PEER_PYTHON = REPO / ".peers" / "vllm" / "bin" / "python"  # what `make vllm` installs
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
DTYPES = ("auto", "float32", "bfloat16", "float16")


class VLLMUnavailable(RuntimeError):
    """No interpreter that can import vLLM, or its server did not come up."""


@dataclass(frozen=True)
class VLLMOptions:
    """What the vLLM server is started with (our CLI's options, mapped onto vLLM's)."""

    model_dir: Path
    served_name: str
    dtype: str = "auto"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_loras: int = 8
    max_lora_rank: int = 64
    lora_modules: tuple[tuple[str, Path], ...] = ()  # (name, absolute dir), loaded at start
    seed: int = 0
    enable_prefix_caching: bool = True
    on_gpu: bool = False
    kv_cache_bytes: int = 2 * 1024**3  # CPU: a fixed KV budget (as our --num-kv-blocks auto on CPU)
    gpu_memory_utilization: float = 0.9
    startup_timeout: float = 1200.0  # NOTE: first start on 2 CPU cores compiles kernels: minutes

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("--tensor-parallel-size and --pipeline-parallel-size must be >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {self.dtype!r}")


def find_python() -> Path:
    """The interpreter to run vLLM with: ours if it imports vLLM, else `make vllm`'s venv.

    Raises:
        VLLMUnavailable: neither has vLLM.
    """
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    if PEER_PYTHON.is_file():
        return PEER_PYTHON
    raise VLLMUnavailable("--backend vllm needs vLLM: pip install 'alignserve[vllm]' on a GPU host, "
                          "or `make vllm` (vLLM's CPU build in .peers/vllm)")


def server_argv(python: Path, opts: VLLMOptions, port: int) -> list[str]:
    """The vLLM server's command line (flags of vLLM 0.32's OpenAI server)."""
    argv = [str(python), "-m", VLLM_MODULE, "--model", str(opts.model_dir),
            "--served-model-name", opts.served_name, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", opts.dtype, "--max-model-len", str(opts.max_model_len),
            "--max-num-seqs", str(opts.max_num_seqs), "--max-num-batched-tokens", str(opts.max_num_batched_tokens),
            "--tensor-parallel-size", str(opts.tensor_parallel_size),
            "--pipeline-parallel-size", str(opts.pipeline_parallel_size), "--seed", str(opts.seed),
            "--enable-lora", "--max-loras", str(opts.max_loras), "--max-lora-rank", str(opts.max_lora_rank),
            "--disable-log-stats"]
    if not opts.enable_prefix_caching:
        argv.append("--no-enable-prefix-caching")
    if opts.on_gpu:
        argv += ["--gpu-memory-utilization", str(opts.gpu_memory_utilization)]
    else:
        # NOTE: on CPU, --gpu-memory-utilization is a fraction of *host* memory that vLLM refuses
        # to start without; a fixed KV budget avoids it (bench/peer_specs.py does the same).
        argv += ["--kv-cache-memory-bytes", str(opts.kv_cache_bytes)]
    for name, path in opts.lora_modules:
        argv += ["--lora-modules", f"{name}={path}"]
    return argv


def server_env(base: dict[str, str]) -> dict[str, str]:
    """The child's environment: `base` plus runtime LoRA updates switched on and, unless the
    caller set one, vLLM's CPU threads bound to every core we may use (its default keeps one
    core per NUMA node for its front processes: on 2 cores, 1 compute thread)."""
    env = dict(base)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))))
    return env


class VLLMProcess:
    """One vLLM server we started (its own process group) and its loopback URL."""

    def __init__(self, opts: VLLMOptions, port: int, log_path: Path | None = None) -> None:
        self.opts, self.port = opts, port
        self.base_url = f"http://127.0.0.1:{port}"
        argv = server_argv(find_python(), opts, port)
        logger.info("starting vLLM: %s", " ".join(argv))
        self._log = open(log_path, "ab") if log_path is not None else None
        # NOTE: a new session, so stop() signals vLLM's engine-core and worker processes too.
        self.proc = subprocess.Popen(argv, env=server_env(dict(os.environ)), stdout=self._log,
                                     stderr=subprocess.STDOUT if self._log else None, start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self) -> float:
        """Seconds until vLLM's /health answers 200.

        Raises:
            VLLMUnavailable: the process exited, or `startup_timeout` passed.
        """
        start = time.monotonic()
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while time.monotonic() - start < self.opts.startup_timeout:
                if not self.alive:
                    raise VLLMUnavailable(f"vLLM exited with code {self.proc.returncode} while starting")
                try:
                    if client.get(self.base_url + "/health").status_code == 200:
                        return time.monotonic() - start
                except httpx.HTTPError:
                    pass  # not listening yet
                time.sleep(1.0)
        self.stop()
        raise VLLMUnavailable(f"vLLM did not answer /health within {self.opts.startup_timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM vLLM's process group, SIGKILL what is left after 30 s."""
        try:
            for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
                if not self.alive:
                    return
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    return
                try:
                    self.proc.wait(timeout=wait_s)
                    return
                except subprocess.TimeoutExpired:
                    continue
        finally:
            if self._log is not None:
                self._log.close()
