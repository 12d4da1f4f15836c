"""Starting, loading and stopping the peer servers of `bench.peers`.

Owns: the run's configuration (`PeersConfig`), each peer's install / start / health wait /
stop (each in its own session, so its workers go with it), one level against one started
peer with the CPU it took, and the two ways to run them all: one server at a time
(`run_one_at_a_time`), or all up at once with the levels interleaved (`run_interleaved`, the
schedule and pooling in `bench.interleave`).
Does not: write results or plots (`bench.peers`), or say how a peer is installed (`bench.peer_specs`).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import typer

from bench.config import LengthSpec, Level, LoadConfig, PromptConfig, Target
from bench.interleave import pool_rounds, round_seed, schedule
from bench.machine import cpu_snapshot, cpu_usage, sessions_cpu_s, wait_until_quiet
from bench.peer_specs import (
    DEFAULT_PEERS,
    MODEL_DIR,
    PEER_NAMES,
    PeerSpec,
    alignserve_spec,
    gguf_path,
    llamacpp_spec,
    vllm_spec,
)
from bench.tokens import TokenCounter

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PeersConfig:
    """Which peers, where they live, and the load each one gets."""

    peers: tuple[str, ...] = DEFAULT_PEERS
    peers_dir: Path = ROOT / ".peers"
    out_dir: Path = ROOT / "bench" / "results"
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    num_requests: int = 64
    # Each level sends at least min_waves x c requests: with fewer than c, a closed loop at
    # concurrency c never has c requests in flight (32 requests "at c = 64" are a burst of 32).
    min_waves: int = 1
    input_len: int = 128
    max_tokens: int = 64
    warmup: int = 4
    run_timeout: float = 1800.0
    reinstall: bool = False
    dry_run: bool = False
    install_only: bool = False
    tokenizer: Path | None = None
    rounds: int = 1  # 1: one server at a time; more: all up, levels interleaved (bench.interleave)
    variants: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (name, extra `alignserve serve` args)

    def load_config(self, targets: tuple[Target, ...]) -> LoadConfig:
        """The load every peer gets (greedy; same seeded prompts), all levels at once."""
        prompts = PromptConfig(input_len=LengthSpec(self.input_len, self.input_len),
                               max_tokens=self.max_tokens, seed=0)
        return LoadConfig(targets=targets, levels=tuple(Level(concurrency=c) for c in self.concurrency),
                          prompts=prompts, num_requests=self.num_requests, temperature=0.0,
                          warmup=self.warmup, timeout=self.run_timeout, tokenizer=self.tokenizer)

    def warmup_config(self, target: Target) -> LoadConfig:
        """The warm-up alone (seed 1, as `bench.load` would use); its results are dropped."""
        base = self.load_config((target,))
        n = max(self.warmup, 1)
        return dataclasses.replace(
            base, levels=(Level(concurrency=min(n, max(self.concurrency))),), num_requests=n,
            prompts=dataclasses.replace(base.prompts, seed=1), warmup=0)

    def level_config(self, target: Target, index: int, round_index: int = 0) -> LoadConfig:
        """Level `index` alone, with its own prompts (seed `round_seed(level_seed(index),
        round_index)`), no warm-up.

        NOTE: `bench.load` sends the same prompts at every level; all three servers cache
        prefixes (llama.cpp keeps each slot's last prompt), so c=4 and c=16 would re-read the
        c=1 prompts from cache and report near-zero TTFT. Each level gets fresh texts instead.
        """
        base = self.load_config((target,))
        return dataclasses.replace(
            base, levels=(Level(concurrency=self.concurrency[index]),),
            num_requests=self.requests_at(self.concurrency[index]),
            prompts=dataclasses.replace(base.prompts, seed=round_seed(level_seed(index), round_index)),
            warmup=0)

    def requests_at(self, concurrency: int) -> int:
        """Requests one round of the level at `concurrency` sends."""
        return max(self.num_requests, self.min_waves * concurrency)


def level_seed(index: int) -> int:
    """Prompt seed of level `index`: 0, 100, 200, ... (warm-up uses seed 1)."""
    return 100 * index


def free_port() -> int:
    """A free loopback port (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_version(spec: PeerSpec) -> str | None:
    """The installed version of the peer's distribution, or our git commit."""
    if spec.venv is None:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, check=False)
        return f"git {out.stdout.strip()}" if out.returncode == 0 else None
    py = spec.venv / "bin" / "python"
    if spec.dist is None or not py.exists():
        return None
    code = "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))"
    out = subprocess.run([str(py), "-c", code, spec.dist], text=True, capture_output=True,
                         check=False)
    return f"{spec.dist} {out.stdout.strip()}" if out.returncode == 0 else None


def make_spec(name: str, cfg: PeersConfig, port: int) -> PeerSpec:
    """The spec of one peer by name."""
    if name == "vllm":
        return vllm_spec(cfg.peers_dir, port)
    if name == "vllm-bf16":
        return vllm_spec(cfg.peers_dir, port, dtype="bfloat16")
    if name == "llamacpp":
        return llamacpp_spec(cfg.peers_dir, gguf_path(), port)
    extra = dict(cfg.variants).get(name)
    if extra is not None:
        return alignserve_spec(port, extra_args=extra, name=name)
    if name == "alignserve" or name.startswith("alignserve-"):
        return alignserve_spec(port, name.removeprefix("alignserve").lstrip("-"))
    raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEER_NAMES)}")


def install(spec: PeerSpec, cfg: PeersConfig) -> None:
    """Run the install steps unless a previous install completed (or print them on --dry-run)."""
    marker = spec.marker
    if marker is not None and marker.exists() and not cfg.reinstall:
        typer.echo(f"[{spec.name}] installed already ({marker})")
        return
    for step in spec.install:
        if step.argv is not None:
            env_text = " ".join(f"{k}={v}" for k, v in step.env.items())
            typer.echo(f"[{spec.name}] $ {env_text + ' ' if env_text else ''}{' '.join(step.argv)}")
        else:
            typer.echo(f"[{spec.name}] # {step.describe}")
        if cfg.dry_run:
            continue
        if step.argv is not None:
            subprocess.run(step.argv, check=True, env={**os.environ, **step.env})
        elif step.action is not None:
            step.action()
    if marker is not None and not cfg.dry_run:
        marker.touch()


def wait_ready(proc: subprocess.Popen[bytes], port: int, spec: PeerSpec) -> float:
    """Seconds until the server answers 200 on a health path.

    Raises:
        RuntimeError: the process exited, or `spec.startup_timeout` passed.
    """
    start = time.monotonic()
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while time.monotonic() - start < spec.startup_timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with code {proc.returncode} while starting")
            for path in spec.health_paths:
                try:
                    if client.get(f"http://127.0.0.1:{port}{path}").status_code == 200:
                        return time.monotonic() - start
                except httpx.HTTPError:
                    pass  # not listening yet
            time.sleep(2.0)
    raise RuntimeError(f"not ready after {spec.startup_timeout:.0f}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's own process group (it may have spawned workers), then SIGKILL."""
    if proc.poll() is not None:
        return
    # NOTE: started with start_new_session=True, so the group id is the server's pid: this
    # reaches only the processes we started.
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Launched:
    """A started peer: its process (own session), where to reach it, and what is known of it."""

    name: str
    proc: subprocess.Popen[bytes]
    target: Target
    info: dict[str, Any]


def launch(name: str, cfg: PeersConfig, model_dir: Path | None) -> tuple[Launched | None, dict[str, Any]]:
    """Install and start one peer and wait until it answers. Returns (None, info) when it did
    not come up, or on --dry-run / --install-only; info["status"] then says why."""
    port = free_port()
    spec = make_spec(name, cfg, port)
    model_text = str(model_dir) if model_dir else "<server.models.default_model.ensure_default_model()>"
    argv = tuple(a.replace(MODEL_DIR, model_text) for a in spec.start)
    info: dict[str, Any] = {"command": list(argv), "env": dict(spec.env), "port": port,
                            "status": "dry-run"}
    try:
        install(spec, cfg)
    except (subprocess.CalledProcessError, OSError, ValueError, StopIteration) as exc:
        info["status"] = f"install failed: {exc}"
        return None, info
    if not cfg.dry_run:
        info["version"] = peer_version(spec)
    env_text = "".join(f"{k}={v} " for k, v in spec.env.items())
    typer.echo(f"[{name}] $ {env_text}{' '.join(argv)}")
    typer.echo(f"[{name}] wait for http://127.0.0.1:{port}{spec.health_paths[0]} "
               f"(up to {spec.startup_timeout:.0f}s), load c={','.join(map(str, cfg.concurrency))}"
               f" x {cfg.num_requests} requests x {cfg.rounds} round(s), then stop")
    if cfg.dry_run or cfg.install_only:
        info["status"] = "dry-run" if cfg.dry_run else "installed"
        return None, info
    if model_dir is None and MODEL_DIR in spec.start:
        info["status"] = "start failed: no converted model dir"
        return None, info
    log_path = cfg.peers_dir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    info["log"] = str(log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT) else log_path)
    info["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **spec.env}, start_new_session=True)
    try:
        info["startup_s"] = round(wait_ready(proc, port, spec), 1)
    except (RuntimeError, OSError) as exc:
        stop(proc)
        info["status"] = f"start failed: {exc} (see {log_path})"
        return None, info
    info["cpu"] = []
    return Launched(name, proc, Target(name, f"http://127.0.0.1:{port}/v1"), info), info


def engine_counters(target: Target, api_key: str | None = None) -> dict[str, float]:
    """The engine step counters a server exports on /metrics (ours: alignserve_engine_*), by
    name and phase; {} where it exports none or cannot be read."""
    from prometheus_client.parser import text_string_to_metric_families

    root = target.base_url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{root}/metrics", headers=headers, timeout=10.0)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "alignserve_engine_steps_total":
                found["steps"] = sample.value
            elif sample.name == "alignserve_engine_step_seconds_total":
                found[sample.labels["phase"]] = sample.value
    return found


def engine_split(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, Any]:
    """What the engine thread did during a slot: steps, ms per step in each phase, and the share
    of the slot's wall time it spent in steps (the rest: idle, or the API thread's turn)."""
    steps = after.get("steps", 0.0) - before.get("steps", 0.0)
    if not after or steps <= 0:
        return {}
    phases = {k: after[k] - before.get(k, 0.0) for k in after if k != "steps"}
    return {"steps": int(steps), "ms_per_step": {k: round(1000 * v / steps, 2) for k, v in phases.items()},
            "busy_share": round(sum(phases.values()) / wall_s, 3) if wall_s > 0 else None}


def run_level(peer: Launched, cfg: PeersConfig, counter: TokenCounter, index: int, round_index: int,
              idle: tuple[Launched, ...] = ()) -> list[Any]:
    """One level (one round of it) against one started peer; its CPU use goes into peer.info,
    with the CPU the other, idle servers took meanwhile."""
    from bench.load import run_load_sync

    before = cpu_snapshot(peer.proc.pid)
    idle_sessions = tuple(p.proc.pid for p in idle)
    idle_before = sessions_cpu_s(idle_sessions)
    engine_before, started = engine_counters(peer.target), time.monotonic()
    results = run_load_sync(cfg.level_config(peer.target, index, round_index), counter)
    wall_s = time.monotonic() - started
    usage = cpu_usage(before, cpu_snapshot(peer.proc.pid))
    if idle:
        usage["idle_servers_cpu_s"] = round(sessions_cpu_s(idle_sessions) - idle_before, 1)
    if split := engine_split(engine_before, engine_counters(peer.target), wall_s):
        usage["engine"] = split
    peer.info["cpu"].append({"level": f"c={cfg.concurrency[index]}", "round": round_index, **usage})
    return results


def warm_up(peer: Launched, cfg: PeersConfig, counter: TokenCounter) -> None:
    """The warm-up requests (seed 1); their results are dropped."""
    from bench.load import run_load_sync

    if cfg.warmup:
        run_load_sync(cfg.warmup_config(peer.target), counter)


def run_one_at_a_time(names: tuple[str, ...], cfg: PeersConfig,
                      model_dir: Path | None) -> tuple[list[Any], dict[str, Any]]:
    """Each peer alone: start, warm up, every level, stop; then the next."""
    counter = TokenCounter.load(cfg.tokenizer)  # one tokenizer for every peer and level
    results: list[Any] = []
    infos: dict[str, Any] = {}
    for name in names:
        peer, infos[name] = launch(name, cfg, model_dir)
        if peer is not None:
            try:
                warm_up(peer, cfg, counter)
                for index in range(len(cfg.concurrency)):
                    results.extend(run_level(peer, cfg, counter, index, 0))
                infos[name]["status"] = "ok"
            except (RuntimeError, OSError) as exc:
                infos[name]["status"] = f"failed: {exc}"
            finally:
                stop(peer.proc)
        typer.echo(f"[{name}] {infos[name]['status']}")
    return results, infos


def run_interleaved(names: tuple[str, ...], cfg: PeersConfig,
                    model_dir: Path | None) -> tuple[list[Any], dict[str, Any]]:
    """Every peer up at once, levels run in `interleave.schedule` order; each (peer, level)'s
    rounds pooled (`interleave.pool_rounds`), each round's summary kept in info["rounds"]. Before each
    slot, every server must be quiet (`bench.machine.wait_until_quiet`)."""
    counter = TokenCounter.load(cfg.tokenizer)  # one tokenizer for every peer, level and round
    infos: dict[str, Any] = {}
    up: dict[str, Launched] = {}
    try:
        for name in names:
            peer, infos[name] = launch(name, cfg, model_dir)
            if peer is not None:
                up[name] = peer
        for peer in up.values():
            warm_up(peer, cfg, counter)
        by_key: dict[tuple[str, int], list[Any]] = {}
        for slot in schedule(tuple(up), len(cfg.concurrency), cfg.rounds):
            peer = up[slot.name]
            idle = tuple(p for p in up.values() if p is not peer)
            settled_s = wait_until_quiet(tuple(p.proc.pid for p in up.values()))
            by_key.setdefault((slot.name, slot.level), []).extend(
                run_level(peer, cfg, counter, slot.level, slot.round, idle))
            peer.info["cpu"][-1]["settle_wait_s"] = round(settled_s, 1)
        results = []
        for (name, index), rounds in by_key.items():
            results.append(pool_rounds(rounds))
            infos[name].setdefault("rounds", {})[f"c={cfg.concurrency[index]}"] = [
                {"round": i, "prompt_seed": round_seed(level_seed(index), i), "summary": r.summary}
                for i, r in enumerate(rounds)]
        for name in up:
            infos[name]["status"] = "ok"
        return sorted(results, key=lambda r: names.index(r.target.name)), infos
    finally:
        for peer in up.values():
            stop(peer.proc)
