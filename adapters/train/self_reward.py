"""Self-rewarding training loop (Self-Rewarding Language Models, Yuan et al. 2024) against a
running OpenAI-compatible server: `alignserve train loop --url U --iterations 3 ...`.

Each iteration t: the served model M_t samples `samples` responses to every train prompt
(verifiable instructions, adapters/train/instructions.py, split by template); M_t judges each
(prompt, response) with an LLM-as-a-Judge prompt on a 5-point additive rubric; the highest-
against the lowest-judged response of each prompt is a preference pair (ties give none); DPO
trains M_{t+1} from those pairs, starting from M_t's adapter; the adapter is hot-loaded into the
*running* server (`/v1/load_lora_adapter`) and serves the next iteration. Measured per
iteration, with n and Wilson 95 % intervals: the held-out templates' greedy pass rate under the
instruction checkers, and how well the judge agrees with the checkers (pairwise: of two
responses to one prompt that the checkers' score tells apart, how often the judge orders them
the same way; its ties counted apart).

The judge's verdict is read from the next-token distribution, not from free text: the judge
prompt (rendered with the base model's chat template) ends in the judge's own turn opened with
"Score: ", sent to `/v1/completions`, and the score is the probability-weighted mean of the digits 0-5 among
the top-20 logprobs of the first generated token (as G-Eval scores; a 135M model rarely writes a
parseable verdict, and its likeliest digit is nearly always the same one, which would tie every
pair). None when no digit is among them. The server must be started with `--adapter-root` above `--output`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.train.constraints import score
from adapters.train.preferences import (SamplingConfig, evaluate_pass_rate, load_adapter, map_bounded, open_client,
                                        resolve_model, sample, wilson)

# Additive rubric after Yuan et al. (their Figure 2), in our words: one point per criterion met.
JUDGE_TEMPLATE = """Review the user's request and the reply below. Score the reply from 0 to 5, one point for each:
- the reply is on topic and gives some information related to the request;
- it addresses a substantial part of the request, even if incompletely;
- it answers the basic elements of the request usefully;
- it answers the whole request directly and follows every instruction in it;
- it is clear, focused and expertly written, without extra or missing content.

Request:
{prompt}

Reply:
{response}

Answer with the score only: a single digit from 0 to 5."""
JUDGE_PREFIX = "Score: "
DIGITS = tuple(str(d) for d in range(6))


@dataclass(frozen=True)
class LoopConfig:
    """What one `train loop` run does."""

    output: Path
    iterations: int = 3
    n_prompts: int = 200  # instruction prompts, train + held-out templates
    samples: int = 4  # responses per train prompt per iteration
    temperature: float = 0.8
    max_tokens: int = 128
    judge_max_tokens: int = 1
    seed: int = 0
    concurrency: int = 8
    lr: float = 5e-5  # DPO's usual LoRA rate (TRL's examples, our `train dpo` default)
    beta: float = 0.1
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    base: str | None = None  # local base for training (default: the default model)
    name_prefix: str = "self-reward"


def judge_score(top_logprobs: Sequence[tuple[str, float]]) -> float | None:
    """Expected digit 0-5 under a token's top alternatives (token text stripped), renormalised
    over the digits present; None when none is."""
    digits = [(math.exp(lp), int(tok.strip())) for tok, lp in top_logprobs if tok.strip() in DIGITS]
    total = sum(p for p, _ in digits)
    return sum(p * d for p, d in digits) / total if digits else None


async def judge(client: Any, model: str, prompt: str, response: str, render: Any) -> float | None:
    """The judge's verdict: its turn is opened with "Score: " and the next token is read."""
    text = render(JUDGE_TEMPLATE.format(prompt=prompt, response=response)) + JUDGE_PREFIX
    out = await client.completions.create(model=model, prompt=text, temperature=0.0, max_tokens=1, logprobs=20)
    lp = out.choices[0].logprobs
    if lp is None or not lp.top_logprobs:
        return None
    return judge_score(list(lp.top_logprobs[0].items()))


def chat_renderer(base: str | None) -> Any:
    """user text -> the base model's chat template with the assistant turn opened."""
    from adapters.train.common import load_tokenizer, resolve_base

    tokenizer = load_tokenizer(resolve_base(base))
    return lambda text: tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)


def pick_judged_pair(responses: Sequence[str], judged: Sequence[float | None]) -> tuple[int, int] | None:
    """(chosen, rejected) indices: highest against lowest judged score, first sampled on ties
    within each; None when fewer than two were judged or all judged alike."""
    scored = [(s, i) for i, s in enumerate(judged) if s is not None and responses[i].strip()]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda si: (si[0], -si[1]))
    worst = min(scored, key=lambda si: (si[0], si[1]))
    return None if best[0] == worst[0] else (best[1], worst[1])


def agreement(groups: Sequence[tuple[Sequence[float], Sequence[float | None]]]) -> dict[str, Any]:
    """Judge vs checkers over response pairs of one prompt whose checker scores differ:
    concordant (judge orders them the same way), discordant, judge tie, or unjudged."""
    counts = dict.fromkeys(("concordant", "discordant", "judge_tie", "unjudged"), 0)
    for checker, judged in groups:
        for a in range(len(checker)):
            for b in range(a + 1, len(checker)):
                if checker[a] == checker[b]:
                    continue
                ja, jb = judged[a], judged[b]
                if ja is None or jb is None:
                    counts["unjudged"] += 1
                elif ja == jb:
                    counts["judge_tie"] += 1
                elif (ja > jb) == (checker[a] > checker[b]):
                    counts["concordant"] += 1
                else:
                    counts["discordant"] += 1
    decided = counts["concordant"] + counts["discordant"]
    return {**counts, "n_decided": decided, "rate": counts["concordant"] / decided if decided else None,
            "wilson95": wilson(counts["concordant"], decided)}


async def sample_and_judge(records: Sequence[dict], cfg: SamplingConfig, seed: int, render: Any) -> list[dict]:
    """Every train prompt: `cfg.n` responses from `cfg.model`, each judged by that model."""
    async with open_client(cfg) as client:
        model = await resolve_model(client, cfg.model)

        async def one(i: int, rec: dict) -> dict:
            responses = await sample(client, model, rec["prompt"], cfg, seed + 1000 * i, cfg.n)
            judged = [await judge(client, model, rec["prompt"], r, render) for r in responses]
            return {"prompt": rec["prompt"], "constraints": rec["constraints"], "responses": responses,
                    "judged": judged, "checker": [score(rec["constraints"], r) for r in responses]}

        return await map_bounded(records, one, cfg.concurrency, f"sampling and judging with {model}")


def held_out_pass_rate(heldout: Sequence[dict], server: str, model: str | None, cfg: LoopConfig) -> dict:
    greedy = SamplingConfig(server=server, model=model, temperature=0.0, top_p=1.0, max_tokens=cfg.max_tokens,
                            seed=cfg.seed, concurrency=cfg.concurrency)
    result = asyncio.run(evaluate_pass_rate(heldout, greedy))
    return {"model": result["model"], "n": result["n"], "passed": result["passed"], "pass_rate": result["pass_rate"],
            "wilson95": wilson(result["passed"], result["n"]), "mean_checker_score": result["mean_score"]}


def run_loop(server: str, cfg: LoopConfig, model: str | None = None) -> dict[str, Any]:
    """M0 = `model` (default: the first the server lists) -> M1 ... M_iterations; returns the
    report (also written to `cfg.output / self_reward.json`)."""
    from adapters.train.common import TrainOptions
    from adapters.train.data import write_jsonl
    from adapters.train.dpo import train_dpo
    from adapters.train.instructions import generate_instructions

    cfg.output.mkdir(parents=True, exist_ok=True)
    records = [r.to_json() for r in generate_instructions(cfg.n_prompts, seed=cfg.seed)]
    train = [r for r in records if r["split"] == "train"]
    heldout = [r for r in records if r["split"] == "heldout"]
    render = chat_renderer(cfg.base)
    started = time.monotonic()
    iterations = [{"iteration": 0, "model": model, "heldout": held_out_pass_rate(heldout, server, model, cfg),
                   "seconds": {"eval": round(time.monotonic() - started, 1)}}]
    current, adapter = model, None
    for t in range(1, cfg.iterations + 1):
        sampling = SamplingConfig(server=server, model=current, n=cfg.samples, temperature=cfg.temperature,
                                  max_tokens=cfg.max_tokens, seed=cfg.seed + t, concurrency=cfg.concurrency)
        phase = time.monotonic()
        judged = asyncio.run(sample_and_judge(train, sampling, cfg.seed + 100_000 * t, render))
        seconds = {"sample_and_judge": round(time.monotonic() - phase, 1)}
        pairs = []
        for row in judged:
            picked = pick_judged_pair(row["responses"], row["judged"])
            if picked is not None:
                c, r = picked
                pairs.append({"prompt": row["prompt"], "chosen": row["responses"][c], "rejected": row["responses"][r],
                              "chosen_judge": row["judged"][c], "rejected_judge": row["judged"][r],
                              "chosen_checker": row["checker"][c], "rejected_checker": row["checker"][r]})
        write_jsonl(cfg.output / f"judged_{t}.jsonl", judged)
        write_jsonl(cfg.output / f"pairs_{t}.jsonl", pairs)
        entry: dict[str, Any] = {
            "iteration": t, "judged_by": iterations[-1]["heldout"]["model"], "train_prompts": len(train),
            "responses": sum(len(j["responses"]) for j in judged),
            "unjudged": sum(s is None for j in judged for s in j["judged"]), "pairs": len(pairs),
            "judge_vs_checker": agreement([(j["checker"], j["judged"]) for j in judged]),
            "pairs_checker_agree": sum(p["chosen_checker"] > p["rejected_checker"] for p in pairs),
            "pairs_checker_disagree": sum(p["chosen_checker"] < p["rejected_checker"] for p in pairs),
            "seconds": seconds}
        if not pairs:
            entry["stopped"] = "the judge told no responses apart: no preference pairs"
            iterations.append(entry)
            break
        out_dir = (cfg.output / f"{cfg.name_prefix}-{t}").resolve()
        opts = TrainOptions(data=cfg.output / f"pairs_{t}.jsonl", output=out_dir, base=cfg.base, init_adapter=adapter,
                            lr=cfg.lr, epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
                            seed=cfg.seed + t, overwrite=True, progress=False)
        phase = time.monotonic()
        result = train_dpo(opts, beta=cfg.beta)
        seconds["dpo"] = round(time.monotonic() - phase, 1)
        name = f"{cfg.name_prefix}-{t}"
        load_adapter(server, name, out_dir)
        current, adapter = name, out_dir
        phase = time.monotonic()
        entry |= {"adapter": name, "dpo_steps": result.steps,
                  "dpo_metrics": result.metrics, "heldout": held_out_pass_rate(heldout, server, name, cfg)}
        seconds["eval"] = round(time.monotonic() - phase, 1)
        iterations.append(entry)
        write_report(server, cfg, heldout, iterations, started)  # a cut-off run keeps the iterations it finished
        print(f"iteration {t}: {len(pairs)} pairs, held-out pass rate {entry['heldout']['pass_rate']:.3f} "
              f"{tuple(round(x, 3) for x in entry['heldout']['wilson95'])}, judge-checker agreement "
              f"{entry['judge_vs_checker']['rate']}", file=sys.stderr, flush=True)  # stdout: the CLI's JSON
    return write_report(server, cfg, heldout, iterations, started)


def write_report(server: str, cfg: LoopConfig, heldout: Sequence[dict], iterations: list[dict],
                 started: float) -> dict[str, Any]:
    report = {"benchmark": "self_reward_loop", "command": shlex.join(sys.argv), "server": server,
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
              "heldout_prompts": len(heldout), "wall_s": round(time.monotonic() - started, 1),
              "iterations": iterations}
    (cfg.output / "self_reward.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, cfg.output / "self_reward.png")
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [it for it in report["iterations"] if "heldout" in it]
    xs = [it["iteration"] for it in its]
    rates = [it["heldout"]["pass_rate"] for it in its]
    lo = [r - it["heldout"]["wilson95"][0] for r, it in zip(rates, its)]
    hi = [it["heldout"]["wilson95"][1] - r for r, it in zip(rates, its)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.errorbar(xs, rates, yerr=[lo, hi], marker="o", capsize=4, label="held-out pass rate (95 % CI)")
    agree = [(it["iteration"], it["judge_vs_checker"]["rate"]) for it in report["iterations"]
             if it.get("judge_vs_checker", {}).get("rate") is not None]
    if agree:
        ax.plot([a for a, _ in agree], [r for _, r in agree], "s--", label="judge-checker agreement (its data)")
    ax.set_xlabel("iteration (M_t)")
    ax.set_xticks(xs)
    ax.set_ylim(0, 1)
    ax.set_title(f"self-rewarding loop, {report['heldout_prompts']} held-out prompts", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
