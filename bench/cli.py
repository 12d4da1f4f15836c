"""`alignserve bench load` (also `python -m bench.cli load`): the load tool's command line.

In: CLI options. Out: a progress bar while running, a summary table on stdout, and optionally
a results JSON and a PNG. Exit code 2 for bad options; server faults are results, exit 0.
Does not: compute metrics or schedule requests itself (see `bench.load`, `bench.metrics`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bench.config import (
    LengthSpec, LoadConfig, PromptConfig, Target, make_levels, parse_int_list, parse_rate_list)

app = typer.Typer(help="Benchmarks for OpenAI-compatible servers.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Benchmarks for OpenAI-compatible servers."""
    # NOTE: a callback keeps `load` a named subcommand even while it is the only one.


def build_config(url: str | None, target: list[str], model: str | None, api_key: str | None,
                 endpoint: str, concurrency: str | None, request_rate: str | None,
                 max_concurrency: int | None, num_requests: int, input_len: str, output_len: str,
                 dataset: Path | None, prompt_set: str, num_turns: int, max_tokens: int | None,
                 temperature: float, seed: int, warmup: int, timeout: float,
                 request_timeout: float | None, slo_ttft: float | None, slo_tpot: float | None,
                 tokenizer: Path | None, ignore_eos: bool, progress: bool) -> LoadConfig:
    """Validate CLI values into a `LoadConfig`.

    Raises:
        ValueError: with a message fit for the user.
    """
    targets = [Target.parse(t) for t in target]
    if url:
        targets.insert(0, Target.parse(url))
    if not targets:
        raise ValueError("give --url URL or at least one --target name=URL")
    if len({t.name for t in targets}) != len(targets):
        raise ValueError("target names must differ: use --target name=URL")
    if concurrency and request_rate:
        raise ValueError("--concurrency and --request-rate exclude each other; "
                         "cap a rate run with --max-concurrency")
    if endpoint not in ("chat", "completions"):
        raise ValueError("--endpoint must be chat or completions")
    if prompt_set not in ("synthetic", "multiturn"):
        raise ValueError("--prompt-set must be synthetic or multiturn")
    if dataset is not None and not dataset.is_file():
        raise ValueError(f"--dataset {dataset}: no such file")
    if num_requests < 1 or warmup < 0 or timeout <= 0 or num_turns < 1:
        raise ValueError("need --num-requests >= 1, --warmup >= 0, --timeout > 0, --num-turns >= 1")
    levels = make_levels(parse_int_list(concurrency) if concurrency else None,
                         parse_rate_list(request_rate) if request_rate else None, max_concurrency)
    prompts = PromptConfig(prompt_set=prompt_set, dataset=dataset,  # type: ignore[arg-type]
                           input_len=LengthSpec.parse(input_len),
                           output_len=LengthSpec.parse(output_len), max_tokens=max_tokens,
                           num_turns=num_turns, seed=seed)
    return LoadConfig(targets=tuple(targets), levels=levels, prompts=prompts, model=model,
                      api_key=api_key, endpoint=endpoint,  # type: ignore[arg-type]
                      num_requests=num_requests, temperature=temperature, ignore_eos=ignore_eos,
                      warmup=warmup, timeout=timeout, request_timeout=request_timeout,
                      slo_ttft_ms=slo_ttft, slo_tpot_ms=slo_tpot, tokenizer=tokenizer,
                      progress=progress)


@app.command()
def load(
    url: Annotated[str | None, typer.Option(help="Base URL, e.g. http://127.0.0.1:8000/v1.")] = None,
    target: Annotated[list[str] | None, typer.Option(help="name=URL; repeat to compare servers.")] = None,
    model: Annotated[str | None, typer.Option(help="Model name; default: first of GET /models.")] = None,
    api_key: Annotated[str | None, typer.Option(help="Sent as a Bearer token.")] = None,
    endpoint: Annotated[str, typer.Option(help="chat | completions.")] = "chat",
    concurrency: Annotated[str | None, typer.Option(help="Closed-loop clients per level: 1,4,16.")] = None,
    request_rate: Annotated[str | None, typer.Option(help="Poisson req/s per level: 2,8,inf.")] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="Cap in-flight requests of a rate level.")] = None,
    num_requests: Annotated[int, typer.Option(help="Measured requests per level.")] = 64,
    input_len: Annotated[str, typer.Option(help="Prompt tokens: N or LOW:HIGH (uniform).")] = "128",
    output_len: Annotated[str, typer.Option(help="max_tokens per request: N or LOW:HIGH.")] = "128",
    dataset: Annotated[Path | None, typer.Option(help="JSONL: prompt or messages [, max_tokens].")] = None,
    prompt_set: Annotated[str, typer.Option(help="synthetic | multiturn.")] = "synthetic",
    num_turns: Annotated[int, typer.Option(help="User turns per multiturn conversation.")] = 4,
    max_tokens: Annotated[int | None, typer.Option(help="Fixed max_tokens; overrides --output-len.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for prompts and arrivals.")] = 0,
    warmup: Annotated[int, typer.Option(help="Warm-up requests per target, not measured.")] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds for the whole run.")] = 600.0,
    request_timeout: Annotated[float | None, typer.Option(help="Seconds per request (default: --timeout).")] = None,
    slo_ttft: Annotated[float | None, typer.Option(help="TTFT SLO in ms, for goodput.")] = None,
    slo_tpot: Annotated[float | None, typer.Option(help="TPOT SLO in ms, for goodput.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="HF tokenizer dir for exact token counts.")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Send ignore_eos (vLLM/SGLang/llama.cpp).")] = False,
    output: Annotated[Path | None, typer.Option(help="Write results JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG here.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Load-test one or more OpenAI-compatible servers with streamed requests."""
    try:
        cfg = build_config(url, target or [], model, api_key, endpoint, concurrency, request_rate,
                           max_concurrency, num_requests, input_len, output_len, dataset,
                           prompt_set, num_turns, max_tokens, temperature, seed, warmup, timeout,
                           request_timeout, slo_ttft, slo_tpot, tokenizer, ignore_eos, progress)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    # Heavy imports (numpy, tqdm, matplotlib) only once the options are known to be good.
    from bench.load import run_load_sync
    from bench.report import format_table, results_json, write_json, write_plot

    try:
        results = run_load_sync(cfg)
    except (ValueError, OSError) as exc:  # unreadable dataset or tokenizer
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(format_table(results))
    if output is not None:
        write_json(output, results_json(cfg, results))
        typer.echo(f"wrote {output}")
    if plot is not None:
        write_plot(plot, results, title=f"bench load: /{endpoint}, input {cfg.prompts.input_len}, "
                   f"output {cfg.prompts.max_tokens or cfg.prompts.output_len} tokens")
        typer.echo(f"wrote {plot}")


def _register_perplexity() -> None:
    # `alignserve bench perplexity`: perplexity through any server's prompt logprobs.
    from bench.perplexity import perplexity_cmd

    app.command("perplexity")(perplexity_cmd)


_register_perplexity()

QUALITY_SUITES = {"dola": "bench.dola_quality", "instructions": "bench.instruction_quality"}  # suite -> module with main(argv)


@app.command("quality", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def quality(ctx: typer.Context,
            suite: Annotated[str, typer.Option(help=f"One of: {', '.join(QUALITY_SUITES)}.")] = "dola") -> None:
    """Measured quality (issue 14): runs a suite's script; other options go to it (e.g. --quick)."""
    import importlib

    if suite not in QUALITY_SUITES:
        typer.echo(f"error: --suite {suite!r}: choose from {', '.join(QUALITY_SUITES)}", err=True)
        raise typer.Exit(2)
    importlib.import_module(QUALITY_SUITES[suite]).main(list(ctx.args))

if __name__ == "__main__":
    app()
