"""`python -m bench.peers` (`make bench-peers`): the same load against vLLM, llama.cpp and ours.

Installs each peer into its own virtualenv under `.peers/` (once; see `bench.peer_specs`),
starts it on 127.0.0.1 with the same model (SmolLM2-135M-Instruct: the converted safetensors
for vLLM and ours, the packaged GGUF for llama.cpp), waits for it to answer, runs the load
(greedy, default concurrency 1,4,16, max_tokens 64), stops it, and goes on to the next: one
server at a time. Prompts are the seeded word-count synthetic set, so every peer and every
invocation gets the very same texts; servers report the true token counts in `usage`. Writes `peers.json` and `peers.png` into bench/results/.
`--dry-run` prints every command and changes nothing. A peer that fails to install or start is
reported in the JSON and skipped; it never stops the others.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from bench.config import LengthSpec, Level, LoadConfig, PromptConfig, Target, parse_int_list
from bench.peer_specs import (
    MODEL_DIR, PEER_NAMES, PeerSpec, alignserve_spec, gguf_path, llamacpp_spec, vllm_spec)

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)


@dataclass(frozen=True)
class PeersConfig:
    """Which peers, where they live, and the load each one gets."""

    peers: tuple[str, ...] = PEER_NAMES
    peers_dir: Path = ROOT / ".peers"
    out_dir: Path = ROOT / "bench" / "results"
    concurrency: tuple[int, ...] = (1, 4, 16)
    num_requests: int = 64
    input_len: int = 128
    max_tokens: int = 64
    warmup: int = 4
    run_timeout: float = 1800.0
    reinstall: bool = False
    dry_run: bool = False

    def load_config(self, targets: tuple[Target, ...]) -> LoadConfig:
        """The load every peer gets (greedy; same seeded prompts)."""
        prompts = PromptConfig(input_len=LengthSpec(self.input_len, self.input_len),
                               max_tokens=self.max_tokens, seed=0)
        return LoadConfig(targets=targets, levels=tuple(Level(concurrency=c) for c in self.concurrency),
                          prompts=prompts, num_requests=self.num_requests, temperature=0.0,
                          warmup=self.warmup, timeout=self.run_timeout)


def free_port() -> int:
    """A free loopback port (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def converted_model_dir() -> Path:
    """The default model as safetensors; imported late: converting is heavy and dry runs skip it."""
    from server.models.default_model import ensure_default_model

    return Path(ensure_default_model())


def make_spec(name: str, cfg: PeersConfig, port: int) -> PeerSpec:
    """The spec of one peer by name."""
    if name == "vllm":
        return vllm_spec(cfg.peers_dir, port)
    if name == "llamacpp":
        return llamacpp_spec(cfg.peers_dir, gguf_path(), port)
    if name == "alignserve":
        return alignserve_spec(port)
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


def run_peer(name: str, cfg: PeersConfig, model_dir: Path | None) -> tuple[list[Any], dict[str, Any]]:
    """Install, start, load, stop one peer; returns (level results, status info)."""
    from bench.load import run_load_sync

    port = free_port()
    spec = make_spec(name, cfg, port)
    model_text = str(model_dir) if model_dir else "<server.models.default_model.ensure_default_model()>"
    argv = tuple(a.replace(MODEL_DIR, model_text) for a in spec.start)
    info: dict[str, Any] = {"command": list(argv), "port": port, "status": "dry-run"}
    try:
        install(spec, cfg)
    except (subprocess.CalledProcessError, OSError, ValueError, StopIteration) as exc:
        info["status"] = f"install failed: {exc}"
        return [], info
    target = Target(name, f"http://127.0.0.1:{port}/v1")
    typer.echo(f"[{name}] $ {' '.join(argv)}")
    typer.echo(f"[{name}] wait for http://127.0.0.1:{port}{spec.health_paths[0]} "
               f"(up to {spec.startup_timeout:.0f}s), load c={','.join(map(str, cfg.concurrency))}"
               f" x {cfg.num_requests} requests, then stop")
    if cfg.dry_run:
        return [], info
    if model_dir is None and MODEL_DIR in spec.start:
        info["status"] = "start failed: no converted model dir"
        return [], info
    log_path = cfg.peers_dir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    info["log"] = str(log_path)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **spec.env}, start_new_session=True)
        try:
            info["startup_s"] = round(wait_ready(proc, port, spec), 1)
            results = run_load_sync(cfg.load_config((target,)))
            info["status"] = "ok"
            return results, info
        except (RuntimeError, OSError) as exc:
            info["status"] = f"start failed: {exc} (see {log_path})"
            return [], info
        finally:
            stop(proc)


@app.command()
def main(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the commands; run nothing.")] = False,
    peers: Annotated[str, typer.Option(help="Comma list of vllm,llamacpp,alignserve.")] = ",".join(PEER_NAMES),
    concurrency: Annotated[str, typer.Option(help="Levels, e.g. 1,4,16.")] = "1,4,16",
    num_requests: Annotated[int, typer.Option(help="Requests per level.")] = 64,
    input_len: Annotated[int, typer.Option(help="Prompt tokens.")] = 128,
    max_tokens: Annotated[int, typer.Option(help="max_tokens per request.")] = 64,
    warmup: Annotated[int, typer.Option(help="Warm-up requests per peer.")] = 4,
    peers_dir: Annotated[Path, typer.Option(help="Where the peers' venvs live.")] = ROOT / ".peers",
    out_dir: Annotated[Path, typer.Option(help="Where peers.json / peers.png go.")] = ROOT / "bench" / "results",
    reinstall: Annotated[bool, typer.Option(help="Install again even if installed.")] = False,
) -> None:
    """Install and compare peer servers under the same load, one at a time."""
    names = tuple(n.strip() for n in peers.split(",") if n.strip())
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown or not names:
        typer.echo(f"error: unknown peers {unknown}; choose from {', '.join(PEER_NAMES)}", err=True)
        raise typer.Exit(2)
    cfg = PeersConfig(peers=names, peers_dir=peers_dir, out_dir=out_dir,
                      concurrency=parse_int_list(concurrency), num_requests=num_requests,
                      input_len=input_len, max_tokens=max_tokens, warmup=warmup,
                      reinstall=reinstall, dry_run=dry_run)
    model_dir: Path | None = None
    if not dry_run and "vllm" in names:
        try:
            model_dir = converted_model_dir()
        except Exception as exc:  # noqa: BLE001 -- vLLM is then reported as failed, others run
            typer.echo(f"[vllm] no converted model: {exc!r}", err=True)
    all_results: list[Any] = []
    infos: dict[str, Any] = {}
    for name in names:
        results, infos[name] = run_peer(name, cfg, model_dir)
        all_results.extend(results)
        typer.echo(f"[{name}] {infos[name]['status']}")
    json_path, png_path = cfg.out_dir / "peers.json", cfg.out_dir / "peers.png"
    if dry_run:
        typer.echo(f"would write {json_path} and {png_path}")
        return
    from bench.report import format_table, results_json, write_json, write_plot

    load_cfg = cfg.load_config(tuple(Target(n, f"http://127.0.0.1:{i['port']}/v1")
                                     for n, i in infos.items()))
    write_json(json_path, results_json(load_cfg, all_results, extra={"peers": infos}))
    if all_results:
        typer.echo(format_table(all_results))
        write_plot(png_path, all_results, title="peers: SmolLM2-135M-Instruct, greedy, CPU")
    typer.echo(f"wrote {json_path}" + (f" and {png_path}" if all_results else ""))


if __name__ == "__main__":
    app()
