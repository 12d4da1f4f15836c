"""Typer front for the offline trainer: `train_app` (sft/dpo/rm/arm) and `data_app`
(instructions/preferences/self-instruct). server/cli.py mounts them as `alignserve train|data`;
`python -m adapters.train.cli train sft ...` runs the same commands standalone.

Only argument parsing and error reporting live here: user errors (`TrainError`, `DataError`) print
one clear message and exit with status 2; heavy imports happen inside the commands.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from adapters.train.common import DEFAULT_LR, LoraOptions, TrainError, TrainOptions, TrainResult, summary_lines
from adapters.train.data import DataError

train_app = typer.Typer(help="Train LoRA adapters (SFT, DPO, reward model, GenARM ARM).", no_args_is_help=True)
data_app = typer.Typer(help="Build training data locally or from an OpenAI-compatible server.",
                       no_args_is_help=True)

Data = Annotated[Path, typer.Option(help="Training data (JSONL).")]
Output = Annotated[Path, typer.Option(help="Adapter output directory.")]
Base = Annotated[str | None, typer.Option(help="Base model dir or name (default: the default model).")]
InitAdapter = Annotated[Path | None, typer.Option(help="Continue training this PEFT adapter.")]
EvalData = Annotated[Path | None, typer.Option(help="Held-out data (JSONL) for final metrics.")]
LoraR = Annotated[int, typer.Option(help="LoRA rank.")]
LoraAlpha = Annotated[int, typer.Option(help="LoRA alpha.")]
LoraDropout = Annotated[float, typer.Option(help="LoRA dropout.")]
Targets = Annotated[str, typer.Option(help="Comma-separated projections to adapt.")]
Lr = Annotated[float | None, typer.Option(help=f"Learning rate (default: per method, {DEFAULT_LR}).")]
Scheduler = Annotated[str, typer.Option(help="transformers lr_scheduler_type (cosine, constant_with_warmup, ...).")]
Warmup = Annotated[float, typer.Option(help="Warmup: a fraction of the steps if < 1, else a step count.")]
Epochs = Annotated[float, typer.Option(help="Training epochs (ignored when --max-steps > 0).")]
MaxSteps = Annotated[int, typer.Option(help="Stop after this many optimizer steps (-1: use --epochs).")]
BatchSize = Annotated[int, typer.Option(help="Examples (or pairs) per step.")]
GradAccum = Annotated[int, typer.Option(help="Gradient accumulation steps.")]
MaxLength = Annotated[int, typer.Option(help="Maximum tokens per sequence.")]
Seed = Annotated[int, typer.Option(help="Seed for init, shuffling and dropout.")]
LogSteps = Annotated[int, typer.Option(help="Log the loss every N steps.")]
Overwrite = Annotated[bool, typer.Option(help="Replace an adapter already in --output.")]

_LORA = LoraOptions()
_OPTS = TrainOptions(data=Path(), output=Path())
DEFAULT_TARGETS = ",".join(_LORA.target_modules)


def _options(role: str, data: Path, output: Path, base: str | None, init_adapter: Path | None,
             eval_data: Path | None, lora_r: int, lora_alpha: int, lora_dropout: float, target_modules: str,
             lr: float | None, lr_scheduler: str, warmup: float, epochs: float, max_steps: int, batch_size: int, grad_accum: int,
             max_length: int, seed: int, logging_steps: int, overwrite: bool) -> TrainOptions:
    targets = tuple(t.strip() for t in target_modules.split(",") if t.strip())
    return TrainOptions(
        data=data, output=output, base=base, init_adapter=init_adapter, eval_data=eval_data,
        lora=LoraOptions(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=targets),
        lr=lr, lr_scheduler=lr_scheduler, warmup=warmup, epochs=epochs, max_steps=max_steps,
        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, seed=seed,
        logging_steps=logging_steps, overwrite=overwrite)


def _run(fn: Callable[[], Any]) -> Any:
    """Call `fn`, turning user errors into one message and exit status 2."""
    try:
        return fn()
    except (TrainError, DataError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _train(role: str, flags: dict[str, Any], train: Callable[[TrainOptions], TrainResult]) -> None:
    """Build options from a command's common flags, train, print the summary as JSON."""
    result = _run(lambda: train(_options(role, **flags)))
    # The curve and the sample go to stderr: stdout stays one JSON document.
    typer.echo("\n".join(summary_lines(result)), err=True)
    typer.echo(json.dumps({"output": str(result.output), "steps": result.steps, "metrics": result.metrics},
                          indent=2))


@train_app.command("sft")
def train_sft_cmd(data: Data, output: Output, base: Base = None, init_adapter: InitAdapter = None,
                  eval_data: EvalData = None, lora_r: LoraR = _LORA.r, lora_alpha: LoraAlpha = _LORA.alpha,
                  lora_dropout: LoraDropout = _LORA.dropout, target_modules: Targets = DEFAULT_TARGETS,
                  lr: Lr = None, lr_scheduler: Scheduler = _OPTS.lr_scheduler, warmup: Warmup = _OPTS.warmup,
                  epochs: Epochs = _OPTS.epochs, max_steps: MaxSteps = _OPTS.max_steps,
                  batch_size: BatchSize = _OPTS.batch_size, grad_accum: GradAccum = _OPTS.grad_accum,
                  max_length: MaxLength = _OPTS.max_length, seed: Seed = _OPTS.seed,
                  logging_steps: LogSteps = _OPTS.logging_steps, overwrite: Overwrite = False) -> None:
    """SFT on chat messages (loss on assistant tokens only)."""
    flags = dict(locals())
    from adapters.train.sft import train_sft
    _train("sft", flags, train_sft)


@train_app.command("dpo")
def train_dpo_cmd(data: Data, output: Output, base: Base = None, init_adapter: InitAdapter = None,
                  eval_data: EvalData = None, lora_r: LoraR = _LORA.r, lora_alpha: LoraAlpha = _LORA.alpha,
                  lora_dropout: LoraDropout = _LORA.dropout, target_modules: Targets = DEFAULT_TARGETS,
                  lr: Lr = None, lr_scheduler: Scheduler = _OPTS.lr_scheduler, warmup: Warmup = _OPTS.warmup,
                  epochs: Epochs = _OPTS.epochs, max_steps: MaxSteps = _OPTS.max_steps,
                  batch_size: BatchSize = _OPTS.batch_size, grad_accum: GradAccum = _OPTS.grad_accum,
                  max_length: MaxLength = _OPTS.max_length, seed: Seed = _OPTS.seed,
                  logging_steps: LogSteps = _OPTS.logging_steps, overwrite: Overwrite = False,
                  beta: Annotated[float, typer.Option(help="DPO temperature.")] = 0.1) -> None:
    """DPO on prompt/chosen/rejected (reference = base with the adapter disabled)."""
    flags = dict(locals())
    del flags["beta"]
    from adapters.train.dpo import train_dpo
    _train("dpo", flags, lambda opts: train_dpo(opts, beta=beta))


@train_app.command("rm")
def train_rm_cmd(data: Data, output: Output, base: Base = None, init_adapter: InitAdapter = None,
                 eval_data: EvalData = None, lora_r: LoraR = _LORA.r, lora_alpha: LoraAlpha = _LORA.alpha,
                 lora_dropout: LoraDropout = _LORA.dropout, target_modules: Targets = DEFAULT_TARGETS,
                 lr: Lr = None, lr_scheduler: Scheduler = _OPTS.lr_scheduler, warmup: Warmup = _OPTS.warmup,
                 epochs: Epochs = _OPTS.epochs, max_steps: MaxSteps = _OPTS.max_steps,
                 batch_size: BatchSize = _OPTS.batch_size, grad_accum: GradAccum = _OPTS.grad_accum,
                 max_length: MaxLength = _OPTS.max_length, seed: Seed = _OPTS.seed,
                 logging_steps: LogSteps = _OPTS.logging_steps, overwrite: Overwrite = False,
                 center_rewards: Annotated[float, typer.Option(help="Reward-centering coefficient.")] = 0.01
                 ) -> None:
    """Bradley-Terry reward model: LoRA + scalar score head."""
    flags = dict(locals())
    del flags["center_rewards"]
    from adapters.train.reward import train_rm
    _train("rm", flags, lambda opts: train_rm(opts, center_rewards=center_rewards or None))


@train_app.command("arm")
def train_arm_cmd(data: Data, output: Output, base: Base = None, init_adapter: InitAdapter = None,
                  eval_data: EvalData = None, lora_r: LoraR = _LORA.r, lora_alpha: LoraAlpha = _LORA.alpha,
                  lora_dropout: LoraDropout = _LORA.dropout, target_modules: Targets = DEFAULT_TARGETS,
                  lr: Lr = None, lr_scheduler: Scheduler = _OPTS.lr_scheduler, warmup: Warmup = _OPTS.warmup,
                  epochs: Epochs = _OPTS.epochs, max_steps: MaxSteps = _OPTS.max_steps,
                  batch_size: BatchSize = _OPTS.batch_size, grad_accum: GradAccum = _OPTS.grad_accum,
                  max_length: MaxLength = _OPTS.max_length, seed: Seed = _OPTS.seed,
                  logging_steps: LogSteps = _OPTS.logging_steps, overwrite: Overwrite = False,
                  beta_r: Annotated[float, typer.Option(help="ARM loss temperature beta_r.")] = 0.05,
                  gamma: Annotated[float, typer.Option(help="Target margin gamma.")] = 0.0) -> None:
    """GenARM autoregressive reward model (summed response log-probs, no reference)."""
    flags = dict(locals())
    del flags["beta_r"], flags["gamma"]
    from adapters.train.arm import train_arm
    _train("arm", flags, lambda opts: train_arm(opts, beta_r=beta_r, gamma=gamma))


Server = Annotated[str, typer.Option(help="OpenAI-compatible base URL (ours by default).")]
Model = Annotated[str | None, typer.Option(help="Model (or adapter) name (default: first in /v1/models).")]
Concurrency = Annotated[int, typer.Option(help="Requests in flight.")]
DEFAULT_SERVER = "http://localhost:8000/v1"
DEFAULT_INSTRUCTIONS = Path("data/instructions")


def _run_client(coro_fn: Callable[[], Any], server: str) -> Any:
    """Run a coroutine that talks to the server; connection and HTTP errors exit with status 2."""
    from openai import APIConnectionError, APIStatusError

    try:
        return asyncio.run(coro_fn())
    except APIConnectionError as exc:
        typer.echo(f"error: cannot reach {server} ({exc})", err=True)
    except APIStatusError as exc:
        typer.echo(f"error: {server} answered {exc.status_code}: {exc.message}", err=True)
    raise typer.Exit(2)


@train_app.command("loop")
def train_loop_cmd(
        url: Annotated[str, typer.Option(help="The running alignserve server's base URL (.../v1); it must "
                                              "be started with --adapter-root above --output.")] = DEFAULT_SERVER,
        output: Annotated[Path, typer.Option(help="Adapters, judged samples, pairs and self_reward.json/.png.")]
        = Path("data/self_reward"),
        iterations: Annotated[int, typer.Option(min=1, help="Self-rewarding iterations (M1 ... M_t).")] = 3,
        model: Model = None, base: Base = None,
        n_prompts: Annotated[int, typer.Option(min=2, help="Instruction prompts, train + held-out.")] = 200,
        samples: Annotated[int, typer.Option(min=2, help="Responses per train prompt per iteration.")] = 4,
        temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
        max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per response.")] = 128,
        lr: Annotated[float, typer.Option(help="DPO learning rate.")] = 5e-5,
        beta: Annotated[float, typer.Option(help="DPO temperature.")] = 0.1,
        epochs: Epochs = 1.0, max_steps: MaxSteps = -1, batch_size: BatchSize = 4,
        seed: Seed = 0, concurrency: Concurrency = 8) -> None:
    """Self-rewarding loop (Yuan et al. 2024): sample, self-judge, DPO, hot-load; per-iteration held-out pass rate."""
    from adapters.train.self_reward import LoopConfig, run_loop

    cfg = LoopConfig(output=output, iterations=iterations, n_prompts=n_prompts, samples=samples,
                     temperature=temperature, max_tokens=max_tokens, seed=seed, concurrency=concurrency, lr=lr,
                     beta=beta, epochs=epochs, max_steps=max_steps, batch_size=batch_size, base=base)
    # The trainer's progress lines print to stdout; stdout carries only the JSON summary below.
    with contextlib.redirect_stdout(sys.stderr):
        report = _run(lambda: _run_client_sync(lambda: run_loop(url, cfg, model=model), url))
    typer.echo(json.dumps({"output": str(output / "self_reward.json"),
                           "iterations": [{"iteration": it["iteration"], "pairs": it.get("pairs"),
                                           "heldout_pass_rate": it.get("heldout", {}).get("pass_rate"),
                                           "judge_checker_agreement": it.get("judge_vs_checker", {}).get("rate"),
                                           "stopped": it.get("stopped")} for it in report["iterations"]]},
                          indent=2))


def _run_client_sync(fn: Callable[[], Any], server: str) -> Any:
    """Call `fn` (which talks to the server); connection and HTTP errors exit with status 2."""
    import httpx
    from openai import APIConnectionError, APIStatusError

    from adapters.train.preferences import AdapterLoadError

    try:
        return fn()
    except (APIConnectionError, httpx.TransportError) as exc:
        typer.echo(f"error: cannot reach {server} ({exc})", err=True)
    except APIStatusError as exc:
        typer.echo(f"error: {server} answered {exc.status_code}: {exc.message}", err=True)
    except AdapterLoadError as exc:
        typer.echo(f"error: {exc} (start the server with --adapter-root above --output)", err=True)
    raise typer.Exit(2)


@data_app.command("instructions")
def data_instructions_cmd(
        output_dir: Annotated[Path, typer.Option(help="Writes train.jsonl and heldout.jsonl here.")]
        = DEFAULT_INSTRUCTIONS,
        n: Annotated[int, typer.Option(help="Number of prompts (train + held-out).")] = 600,
        seed: Seed = 0,
        heldout_frac: Annotated[float, typer.Option(help="Fraction of task templates held out.")] = 0.4,
        max_constraints: Annotated[int, typer.Option(help="Constraints per prompt, at most.")] = 3) -> None:
    """Verifiable instruction-following prompts (IFEval-style), split by task template."""
    from adapters.train.data import write_jsonl
    from adapters.train.instructions import generate_instructions

    try:
        records = generate_instructions(n, seed=seed, heldout_frac=heldout_frac, max_constraints=max_constraints)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    counts = {}
    for split in ("train", "heldout"):
        counts[split] = write_jsonl(output_dir / f"{split}.jsonl",
                                    (r.to_json() for r in records if r.split == split))
    typer.echo(json.dumps({"output_dir": str(output_dir), **counts}))


@data_app.command("preferences")
def data_preferences_cmd(
        server: Server = DEFAULT_SERVER, model: Model = None,
        n: Annotated[int, typer.Option(help="Responses sampled per prompt.")] = 8,
        prompts: Annotated[Path, typer.Option(help="Instruction records (JSONL).")]
        = DEFAULT_INSTRUCTIONS / "train.jsonl",
        output: Annotated[Path, typer.Option(help="Preference pairs (JSONL).")] = Path("data/preferences.jsonl"),
        limit: Annotated[int | None, typer.Option(help="Use only the first N prompts.")] = None,
        temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
        top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = 0.95,
        max_tokens: Annotated[int, typer.Option(help="Tokens per response.")] = 256,
        seed: Seed = 0, concurrency: Concurrency = 8) -> None:
    """Sample N responses per prompt, score with the checkers, emit best-vs-worst pairs."""
    from adapters.train.data import write_jsonl
    from adapters.train.preferences import SamplingConfig, build_preferences, load_instructions

    if n < 2:
        typer.echo("error: --n must be at least 2 to form pairs", err=True)
        raise typer.Exit(2)
    records = _run(lambda: load_instructions(str(prompts)))[:limit]
    cfg = SamplingConfig(server=server, model=model, n=n, temperature=temperature, top_p=top_p,
                         max_tokens=max_tokens, seed=seed, concurrency=concurrency)
    rows, stats = _run_client(lambda: build_preferences(records, cfg), server)
    write_jsonl(output, rows)
    typer.echo(json.dumps({"output": str(output), **stats}))


@data_app.command("self-instruct")
def data_self_instruct_cmd(
        server: Server = DEFAULT_SERVER, model: Model = None,
        n: Annotated[int, typer.Option(help="Instruction/answer pairs wanted.")] = 100,
        output: Annotated[Path, typer.Option(help="SFT rows (JSONL).")] = Path("data/self_instruct.jsonl"),
        base: Annotated[str | None, typer.Option(help="Tokenizer (chat template) of the served model "
                                                      "(default: the default model).")] = None,
        system_prompt: Annotated[str | None, typer.Option(help="System message in the pre-query prefix.")]
        = None,
        answer_max_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 512,
        seed: Seed = 0, concurrency: Concurrency = 8) -> None:
    """Magpie: send the chat template's pre-query prefix, keep the generated user turns, answer them."""
    from transformers import AutoTokenizer

    from adapters.train.common import resolve_base
    from adapters.train.data import write_jsonl
    from adapters.train.preferences import SamplingConfig
    from adapters.train.self_instruct import MagpieConfig, synthesize

    tokenizer = AutoTokenizer.from_pretrained(_run(lambda: resolve_base(base)).path)
    sampling = SamplingConfig(server=server, model=model, seed=seed, concurrency=concurrency)
    cfg = MagpieConfig(n=n, answer_max_tokens=answer_max_tokens, system_prompt=system_prompt)
    rows, stats = _run_client(lambda: synthesize(tokenizer, sampling, cfg), server)
    write_jsonl(output, rows)
    typer.echo(json.dumps({"output": str(output), **stats}))


app = typer.Typer(help="alignserve offline trainer (standalone entry point).", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(data_app, name="data")

if __name__ == "__main__":
    app()


@data_app.command("rag-reader")
def data_rag_reader_cmd(
        index: Annotated[str, typer.Option(help="Collection the questions are answered from.")],
        questions: Annotated[Path, typer.Option(help="JSONL of {question, answer}.")],
        output: Annotated[Path, typer.Option(help="SFT examples (JSONL) for `alignserve train sft`.")],
        index_root: Annotated[Path | None, typer.Option(envvar="ALIGNSERVE_INDEX_ROOT",
                                                        help="Collections directory.")] = None,
        top_k: Annotated[int, typer.Option(help="Passages retrieved per question.")] = 3,
        cite: Annotated[bool, typer.Option(help="Answers cite the passage that holds them.")] = True) -> None:
    """RA-DIT reader data: each question with its retrieved passages, prompted as `rag` prompts."""
    from adapters.train.data import write_jsonl
    from adapters.train.rag_reader import build_reader_examples
    from retrieval.service import Retrieval, default_root
    from retrieval.store import StoreError

    retrieval = Retrieval(index_root or default_root())
    try:
        rows, counts = build_reader_examples(retrieval, index, questions, top_k, cite)
    except (DataError, StoreError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        retrieval.close()
    write_jsonl(output, rows)
    typer.echo(json.dumps({"output": str(output), **counts}))
