"""`python -m bench.dola_quality`: does DoLa make the served model pick true facts more often?

The items are bench/facts.py's factual multiple-choice set (≈ 300 questions, four options each).
Every option is scored as DoLa's paper scores TruthfulQA-MC / FACTOR answers (the reference's
`lm_score`): the summed log-probability of the option's tokens after a fixed two-shot
"Q: ... A:" prompt, under
- the base model (baseline);
- DoLa-static: the contrast with one premature layer j, for every j below the final layer;
- DoLa-dynamic: HF's "low" and "high" buckets, the layer picked per token by divergence;
in three settings (`--settings`): the reference's raw contrast summed (its `post_softmax=False`)
with relative_top 0 (TruthfulQA-MC's) and 0.1 (FACTOR's; implausible tokens at -1000), and
the engine's DoLa prompt logprobs (the contrast log-softmaxed: DoLa's own next-token
distribution, the reference's `post_softmax=True`) at relative_top 0.1. An item
counts as right when its true option scores strictly highest (MC1). The static layer and the
bucket are chosen by 2-fold cross-validation over the items (chosen on one half, scored on the
other), as the paper chose its buckets; per-variant accuracies on all items are also kept, but
they select on the test set and are not estimates.

How: one engine request per option returns every layer's hidden states at the prompt's
positions (`SamplingParams.prompt_taps`), and all variants are scored from them with the
engine's own DoLa code (`server.methods.dola.prompt_contrast`, what `DoLa.adjust_prompt` runs
for prompt logprobs). `engine_check` then scores a few options through real DoLa requests
(`prompt_logprobs`) and records the largest difference. Reported with n, seed and Wilson 95 %
intervals, plus the paired wins / losses against the baseline (exact McNemar p).
Writes JSON (with the command and the machine) and a PNG beside it.
"""
from __future__ import annotations

import json
import math
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.facts import CATEGORIES, MCItem, mc_items
from bench.machine import machine_info
from bench.plots import replot_if_asked, results_parser
from bench.train_loop import wilson

REPO = Path(__file__).resolve().parent.parent
FEW_SHOT = ("Q: How many legs does a spider have?\nA: Eight\n\n"
            "Q: What colour is the sky on a clear day?\nA: Blue\n\n")
Setting = tuple[float, str]  # (relative_top, "raw" | "logprob")
DEFAULT_SETTINGS = "0:raw,0.1:raw,0.1:logprob"
WAVE = 64  # requests in flight: each finished one holds every layer's taps until it is scored
CHECK_OPTIONS = 4  # options also scored through real DoLa requests (engine_check)


def tag(rt: float, mode: str) -> str:
    """The suffix naming a setting in score keys."""
    return f"|rt={rt:g}|{mode}"


def parse_settings(text: str) -> list[Setting]:
    out = []
    for part in text.split(","):
        rt, _, mode = part.partition(":")
        if mode not in ("raw", "logprob"):
            raise ValueError(f"setting {part!r}: expected RELATIVE_TOP:raw or RELATIVE_TOP:logprob")
        out.append((float(rt), mode))
    return out


def prompt_text(item: MCItem) -> str:
    return f"{FEW_SHOT}Q: {item.question}\nA:"


def option_tokens(tokenizer, item: MCItem, option: str) -> tuple[list[int], int]:
    """Token ids of prompt + " option" and where the option's tokens start (as `lm_score`:
    the prompt's own tokenisation, up to where the two tokenisations part)."""
    prefix = tokenizer.encode(prompt_text(item))
    ids = tokenizer.encode(prompt_text(item) + " " + option)
    start = next((i for i, (a, b) in enumerate(zip(prefix, ids)) if a != b), min(len(prefix), len(ids)))
    if start >= len(ids):
        raise ValueError(f"option {option!r} adds no token to its prompt")
    return ids, start


def variants(num_layers: int, tie_word_embeddings: bool) -> dict[str, list[int]]:
    """Variant name -> candidate premature layers (HF hidden_states indices)."""
    from server.methods.dola import resolve_layers

    out = {f"static:{j}": [j] for j in range(num_layers)}
    for bucket in ("low", "high"):
        out[bucket] = resolve_layers(bucket, num_layers, tie_word_embeddings)
    return out


@torch.inference_mode()
def score_option(model, taps: dict[int, torch.Tensor], ids: list[int], start: int,
                 layer_sets: dict[str, list[int]], settings: list[Setting]) -> dict[str, Any]:
    """Summed answer scores for the baseline and every (variant, setting), from one request's
    prompt taps; plus, per dynamic bucket, the premature layer each token used."""
    from server.methods.dola import prompt_contrast, tap_for_layer
    from server.models.llama import FINAL_NORM_TAP

    rows = slice(start - 1, len(ids) - 1)  # position i - 1 predicts token i
    target = torch.tensor(ids[start:])[:, None]
    final = model.compute_logits(taps[FINAL_NORM_TAP][rows].to(model.dtype)).float()  # [A, vocab]
    layers = sorted({j for js in layer_sets.values() for j in js})
    stacked = torch.stack([taps[tap_for_layer(j)][rows] for j in layers], dim=1).to(model.dtype)
    premature = model.compute_logits(stacked).float()  # [A, layers, vocab]
    column = {j: c for c, j in enumerate(layers)}
    out: dict[str, Any] = {"baseline": float(final.log_softmax(-1).gather(1, target).sum()), "picked": {}}
    for rt in dict.fromkeys(rt for rt, _ in settings):
        modes = [mode for r, mode in settings if r == rt]
        for name, js in layer_sets.items():
            scores, best = prompt_contrast(final, premature[:, [column[j] for j in js]], rt)
            for mode in modes:
                # "logprob": what the engine's prompt logprobs make of DoLa.adjust_prompt's scores.
                picked = (scores.log_softmax(-1) if mode == "logprob" else scores).gather(1, target)
                out[name + tag(rt, mode)] = float(picked.sum())
                if len(js) > 1:
                    out["picked"][name + tag(rt, mode)] = [js[b] for b in best.tolist()]
    return out


def score_items(engine, items: list[MCItem], settings: list[Setting]) -> list[list[dict[str, Any]]]:
    """scores[item][option] (see `score_option`), WAVE requests at a time."""
    from server.engine.sequence import SamplingParams
    from server.methods.dola import tap_for_layer
    from server.models.llama import FINAL_NORM_TAP

    config = engine.model_config
    layer_sets = variants(config.num_layers, config.tie_word_embeddings)
    wanted = (FINAL_NORM_TAP,) + tuple(tap_for_layer(j) for j in range(config.num_layers))
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_taps=wanted)
    jobs = [(i, o, *option_tokens(engine.tokenizer, item, opt))
            for i, item in enumerate(items) for o, opt in enumerate(item.options)]
    scores: list[list[Any]] = [[None] * len(item.options) for item in items]
    for w in range(0, len(jobs), WAVE):
        wave = {f"mc-{i}-{o}": (i, o, ids, start) for i, o, ids, start in jobs[w:w + WAVE]}
        for rid, (_, _, ids, _) in wave.items():
            engine.add_request(rid, ids, params)
        while engine.has_unfinished:
            for delta in engine.step():
                if delta.extra and "prompt_taps" in delta.extra:
                    i, o, ids, start = wave[delta.request_id]
                    scores[i][o] = score_option(engine.runner.model, delta.extra["prompt_taps"], ids, start,
                                                layer_sets, settings)
    return scores


def engine_check(engine, items: list[MCItem], scores, settings: list[Setting]) -> dict[str, Any]:
    """The first CHECK_OPTIONS options through real DoLa requests ("high" and one static layer,
    each "logprob" setting): the engine's prompt logprobs summed over the option's tokens."""
    from server.engine.sequence import SamplingParams
    from server.methods.dola import DoLa

    static = engine.model_config.num_layers // 2
    rows, requests = [], {}
    options = [(i, o) for i, item in enumerate(items) for o in range(len(item.options))][:CHECK_OPTIONS]
    for i, o in options:
        ids, start = option_tokens(engine.tokenizer, items[i], items[i].options[o])
        for rt in [rt for rt, mode in settings if mode == "logprob"]:
            for name, spec in (("high", "high"), (f"static:{static}", [static])):
                rid = f"check-{i}-{o}-{name}-{rt:g}"
                requests[rid] = (i, o, start, name + tag(rt, "logprob"))
                engine.add_request(rid, ids, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0),
                                   method=DoLa(spec, rt))
    while engine.has_unfinished:
        for delta in engine.step():
            if delta.extra and "prompt_logprobs" in delta.extra:
                i, o, start, key = requests[delta.request_id]
                engine_score = sum(t.logprob for t in delta.extra["prompt_logprobs"][start:])
                rows.append({"item": i, "option": o, "variant": key, "engine": engine_score,
                             "bench": scores[i][o][key], "abs_diff": abs(engine_score - scores[i][o][key])})
    return {"rows": rows, "max_abs_diff": max((r["abs_diff"] for r in rows), default=None)}


def correct(item_scores: list[dict[str, Any]], answer: int, key: str) -> bool:
    """MC1: the true option strictly above every distractor."""
    true = item_scores[answer][key]
    return all(true > s[key] for o, s in enumerate(item_scores) if o != answer)


def rate(flags: list[bool]) -> dict[str, Any]:
    k, n = sum(flags), len(flags)
    return {"accuracy": k / n if n else None, "k": k, "n": n, "ci95": list(wilson(k, n))}


def folds(items: list[MCItem], seed: int) -> list[list[int]]:
    """Two halves, each category split evenly between them, by `seed`."""
    rng = random.Random(seed)
    halves: list[list[int]] = [[], []]
    for category in CATEGORIES:
        idx = [i for i, item in enumerate(items) if item.category == category]
        rng.shuffle(idx)
        for r, i in enumerate(idx):
            halves[r % 2].append(i)
    return [sorted(h) for h in halves]


def mcnemar_p(wins: int, losses: int) -> float:
    """Exact two-sided McNemar (binomial sign test on the discordant items)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def cross_validate(right: dict[str, list[bool]], family: list[str], halves: list[list[int]]) -> dict[str, Any]:
    """Pick the family's best variant on one half, score it on the other; both ways round."""
    flags: dict[int, bool] = {}
    chosen = []
    for k, test in enumerate(halves):
        train = halves[1 - k]
        best = max(family, key=lambda v: (sum(right[v][i] for i in train), -family.index(v)))
        chosen.append(best)
        flags.update({i: right[best][i] for i in test})
    return {"chosen_per_fold": chosen, "flags": [flags[i] for i in sorted(flags)]}


def summarise(items: list[MCItem], scores, settings: list[Setting], seed: int) -> dict[str, Any]:
    keys = ["baseline"] + [k for k in scores[0][0] if "|" in k]
    right = {key: [correct(s, item.answer, key) for s, item in zip(scores, items)] for key in keys}
    halves = folds(items, seed)
    base = right["baseline"]
    out: dict[str, Any] = {"baseline": rate(base), "folds": [len(h) for h in halves], "by_setting": {}}
    for rt, mode in settings:
        suffix = tag(rt, mode)
        families = {"static": [k for k in keys if k.startswith("static:") and k.endswith(suffix)],
                    "dynamic": [f"low{suffix}", f"high{suffix}"]}
        entry: dict[str, Any] = {"per_variant_all_items": {k.removesuffix(suffix): rate(right[k])["accuracy"]
                                                           for k in keys if k.endswith(suffix)}}
        for name, family in families.items():
            cv = cross_validate(right, family, halves)
            wins = sum(f and not b for f, b in zip(cv["flags"], base))
            losses = sum(b and not f for f, b in zip(cv["flags"], base))
            entry[f"{name}_cv"] = {**rate(cv["flags"]), "chosen_per_fold": [c.removesuffix(suffix)
                                                                            for c in cv["chosen_per_fold"]],
                                   "wins_vs_baseline": wins, "losses_vs_baseline": losses,
                                   "mcnemar_p": mcnemar_p(wins, losses)}
        entry["by_category"] = {c: {key.removesuffix(suffix):
                                    rate([right[key][i] for i, it in enumerate(items) if it.category == c])
                                    for key in ("baseline", f"low{suffix}", f"high{suffix}")} for c in CATEGORIES}
        out["by_setting"][suffix.strip("|")] = entry
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    tops = list(s["by_setting"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.6]})
    labels, vals = ["baseline"], [s["baseline"]]
    for rt in tops:
        for fam in ("static_cv", "dynamic_cv"):
            labels.append(f"{fam.replace('_cv', '')} (CV)\n{rt.replace('|', ' ')}")
            vals.append(s["by_setting"][rt][fam])
    acc = [v["accuracy"] for v in vals]
    err = [[a - v["ci95"][0] for a, v in zip(acc, vals)], [v["ci95"][1] - a for a, v in zip(acc, vals)]]
    ax.bar(range(len(vals)), acc, yerr=err, capsize=3, color=["gray"] + ["tab:blue", "tab:orange"] * len(tops))
    ax.tick_params(axis="x", labelrotation=90)
    ax.axhline(0.25, ls="--", c="gray", lw=1, label="chance (4 options)")
    ax.set_xticks(range(len(vals)), labels, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"MC1 accuracy (n = {s['baseline']['n']}, Wilson 95 %)")
    ax.legend(fontsize=8)
    for rt in tops:
        per = s["by_setting"][rt]["per_variant_all_items"]
        static = sorted((int(k.split(":")[1]), v) for k, v in per.items() if k.startswith("static:"))
        ax2.plot([j for j, _ in static], [v for _, v in static], marker=".", label=f"static j, {rt.replace('|', ' ')}")
    ax2.axhline(s["baseline"]["accuracy"], c="gray", lw=1, label="baseline")
    ax2.set_xlabel("premature layer j (HF hidden_states index)")
    ax2.set_ylabel("accuracy on all items (in-sample)")
    ax2.legend(fontsize=7)
    fig.suptitle(f"DoLa factual MC, {result['model']} ({result['dtype']}), seed {result['seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = results_parser(__doc__.splitlines()[0], REPO / "bench/results/dola_quality.json")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    # float32: a contrast of two log-probs keeps little of bf16 logits' three significant digits.
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0, help="Distractors, option order and the CV folds.")
    p.add_argument("--settings", default=DEFAULT_SETTINGS,
                   help="Comma-separated RELATIVE_TOP:raw|logprob scorings (module docstring).")
    p.add_argument("--quick", action="store_true", help="2 items per category instead of the whole set.")
    args = p.parse_args(argv)
    if replot_if_asked(args, plot):
        return
    from server.config import EngineConfig, SchedulerConfig
    from server.engine.engine import LLMEngine

    settings = parse_settings(args.settings)
    items = mc_items(args.seed, per_category=2 if args.quick else None)
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device="cpu", scheduler=SchedulerConfig(
        max_num_seqs=WAVE, max_num_batched_tokens=2048, max_model_len=2048)))
    start = time.perf_counter()
    scores = score_items(engine, items, settings)
    result = {"benchmark": "dola_quality", "command": "python -m bench.dola_quality " + shlex.join(sys.argv[1:]
                                                                                                  if argv is None
                                                                                                  else argv),
              "machine": machine_info(), "model": args.model, "dtype": str(engine.dtype).removeprefix("torch."),
              "seed": args.seed, "settings": [f"rt={rt:g}|{m}" for rt, m in settings], "n_items": len(items),
              "few_shot_prefix": FEW_SHOT,
              "note": "SmolLM2-135M-Instruct from a GGUF Q4_1 file, dequantised: these are that model's scores. "
                      "Scores: summed over the option's tokens: the base log-prob (baseline); DoLa's contrast "
                      "log q_N - log q_j (raw) or its log-softmax (logprob: the engine's prompt logprobs), "
                      "implausible tokens at -1000 as the reference's relative_top_value. "
                      "MC1 = true option strictly highest. Intervals: Wilson 95 %.",
              "engine_check": engine_check(engine, items, scores, settings),
              "summary": summarise(items, scores, settings, args.seed),
              "wall_s": time.perf_counter() - start,
              "rows": [{"category": it.category, "question": it.question, "options": list(it.options),
                        "answer": it.answer, "scores": {k: [round(s[k], 4) for s in sc] for k in sc[0]
                                                        if k == "baseline" or k.split("|")[0] in ("low", "high")},
                        "picked": [s["picked"] for s in sc]} for it, sc in zip(items, scores)]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    plot(result, args.output.with_suffix(".png"))
    s = result["summary"]
    print(json.dumps({"output": str(args.output), "n": s["baseline"]["n"], "baseline": s["baseline"]["accuracy"],
                      **{f"{fam} {rt}": v[fam]["accuracy"] for rt, v in s["by_setting"].items()
                         for fam in ("static_cv", "dynamic_cv")},
                      "engine_check_max_abs_diff": result["engine_check"]["max_abs_diff"]}))


if __name__ == "__main__":
    main()
