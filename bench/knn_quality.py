"""`python -m bench.knn_quality`: does kNN-LM lower perplexity on held-out text about known entities?

The data is the seeded invented encyclopedia (`bench.encyclopedia`): a datastore is built from
its train split, and the held-out documents mention the same entities in new sentences.

    python -m bench.knn_quality --write-data bench/results/knn_data            # train/eval JSONL, no server
    alignserve index knn-build --name enc-s0 --corpus bench/results/knn_data/train.jsonl
    python -m bench.knn_quality --base-url http://127.0.0.1:8000/v1 --datastore enc-s0 \
        --eval-file bench/results/knn_data/eval.jsonl --out bench/results/knn_quality.json

Against the server (`bench.perplexity`, echoed prompt logprobs, greedy, no sampling involved):
perplexity of the eval documents without kNN-LM (base), then with `knn_lm` for every
lambda x k x temperature of the sweep (shared/methods.md §8: {0.1, 0.25, 0.5} x {16, 64, 256} x
{1, 10}); then the sanity case, ~20 *train* documents (their exact contexts are in the
datastore), base vs the best setting, where a large drop is expected. Every row has N (scored
tokens), perplexity with a 95 % bootstrap interval over documents, and the relative reduction
1 - ppl/ppl_base with a *paired* bootstrap interval (the same resampled documents on both
sides). Tokens on entity names are also scored apart when the server returns `text_offset`.
Project goal: >= 10 % relative reduction on the eval documents.

NOTE: the default model is SmolLM2-135M-Instruct dequantised from Q4_1; say so when quoting.
Writes the JSON, `<out>.png` (reduction per setting, grouped bars) and `<out stem>_per_doc.jsonl`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path as _Path

# NOTE: run as a file, Python puts bench/ first on sys.path, where bench/datasets.py would
# shadow HF `datasets`; the repo root goes there instead.
if sys.path and _Path(sys.path[0]).resolve() == _Path(__file__).resolve().parent:
    sys.path[0] = str(_Path(__file__).resolve().parent.parent)
import itertools
import json
import random
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.encyclopedia import make_encyclopedia, read_jsonl, split, write_jsonl
from bench.machine import machine_info
from bench.perplexity import paired_reduction, perplexity

REPO = Path(__file__).resolve().parent.parent
GOAL = 0.10  # project goal: relative perplexity reduction on held-out documents (methods.md §8)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="Model name (default: the server's first base model).")
    p.add_argument("--datastore", default=None, help="kNN-LM datastore built from the train split.")
    p.add_argument("--eval-file", type=Path, default=None, help="Eval JSONL (default: regenerated from --seed).")
    p.add_argument("--train-file", type=Path, default=None,
                   help="Train JSONL for the sanity case (default: train.jsonl beside --eval-file, else regenerated).")
    p.add_argument("--seed", type=int, default=0, help="Encyclopedia seed.")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--num-entities", type=int, default=300)
    p.add_argument("--held-out", type=float, default=0.2)
    p.add_argument("--lambdas", type=_floats, default=[0.1, 0.25, 0.5])
    p.add_argument("--ks", type=lambda s: [int(v) for v in _floats(s)], default=[16, 64, 256])
    p.add_argument("--temperatures", type=_floats, default=[1.0, 10.0])
    p.add_argument("--sanity-docs", type=int, default=20, help="Train documents in the sanity case (0: skip).")
    p.add_argument("--max-eval-docs", type=int, default=None, help="Score only the first N eval documents.")
    p.add_argument("--window", type=int, default=512, help="Tokens per request, roughly (no eval doc is cut at 512).")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=600.0, help="Seconds per request.")
    p.add_argument("--out", "--output", dest="out", type=Path, default=REPO / "bench/results/knn_quality.json")
    p.add_argument("--replot", type=Path, help="Only redraw the PNG of an existing results JSON.")
    p.add_argument("--write-data", type=Path, metavar="DIR", help="Write train.jsonl and eval.jsonl to DIR and exit.")
    args = p.parse_args(argv)
    if args.replot is None and args.write_data is None and not args.datastore:
        p.error("--datastore NAME is required to run the benchmark")
    return args


def data(args: argparse.Namespace) -> tuple[list[dict], list[dict], str]:
    """(train, eval, where they came from)."""
    train_file = args.train_file
    if train_file is None and args.eval_file is not None and (args.eval_file.parent / "train.jsonl").is_file():
        train_file = args.eval_file.parent / "train.jsonl"
    if args.eval_file is not None and train_file is not None:
        return read_jsonl(train_file), read_jsonl(args.eval_file), f"{train_file}, {args.eval_file}"
    train, evals = split(make_encyclopedia(args.seed, args.num_entities), args.split_seed, args.held_out)
    if args.eval_file is not None:
        evals = read_jsonl(args.eval_file)
    if train_file is not None:
        train = read_jsonl(train_file)
    return train, evals, "regenerated from the seeds" + (f" (eval: {args.eval_file})" if args.eval_file else "")


def write_data(args: argparse.Namespace) -> dict[str, Any]:
    """train.jsonl (`{"id", "title", "text"}`, for knn-build) and eval.jsonl (plus `entities`)."""
    train, evals = split(make_encyclopedia(args.seed, args.num_entities), args.split_seed, args.held_out)
    out = {"train": str(write_jsonl(args.write_data / "train.jsonl", train)),
           "eval": str(write_jsonl(args.write_data / "eval.jsonl", evals, fields=None)),
           "train_docs": len(train), "eval_docs": len(evals),
           "train_words": sum(len(d["text"].split()) for d in train),
           "seed": args.seed, "split_seed": args.split_seed, "num_entities": args.num_entities}
    print(json.dumps(out, indent=1))
    return out


def _row(res: dict[str, Any], base: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    row = {k: res[k] for k in ("ppl", "n_tokens", "ci95", "n_docs", "n_requests", "requests_over_window", "wall_s")}
    row["knn_lm"] = res["knn_lm"]
    for part in ("entity_tokens", "other_tokens"):
        if part in res:
            row[part] = {k: res[part][k] for k in ("ppl", "n_tokens", "ci95")}
    if base is not None:
        row["reduction"] = paired_reduction(base["per_doc"], res["per_doc"], args.bootstrap_seed, args.resamples)
        if "entity_tokens" in res and "entity_tokens" in base:
            row["entity_reduction"] = paired_reduction(base["per_doc"], res["per_doc"], args.bootstrap_seed,
                                                       args.resamples, key="entity_")
        row["alignment_sample"] = res.get("alignment_sample")
    return row


def run(args: argparse.Namespace, transport: Any = None) -> dict[str, Any]:
    train, evals, source = data(args)
    evals = evals[:args.max_eval_docs] if args.max_eval_docs else evals
    started = time.time()
    common = {"model": args.model, "window": args.window, "api_key": args.api_key, "concurrency": args.concurrency,
              "timeout": args.timeout, "seed": args.bootstrap_seed, "resamples": args.resamples, "transport": transport}

    def measure(docs: list[dict], option: dict | None, label: str) -> dict[str, Any]:
        res = perplexity(args.base_url, docs, option, **common)
        common["model"] = res["model"]  # ask GET /models once
        print(f"{label}: ppl {res['ppl']:.4f} N={res['n_tokens']} ({time.time() - started:.0f} s)", file=sys.stderr)
        return res

    base = measure(evals, None, "base")
    per_doc = {"base": base["per_doc"]}
    rows: dict[str, dict] = {"base": _row(base, None, args)}
    warnings = []
    for lam, k, temp in itertools.product(args.lambdas, args.ks, args.temperatures):
        label = f"lambda{lam:g}_k{k}_t{temp:g}"
        option = {"datastore": args.datastore, "k": k, "lambda": lam, "temperature": temp}
        res = measure(evals, option, label)
        per_doc[label] = res["per_doc"]
        rows[label] = _row(res, base, args)
        if res["ppl"] == base["ppl"] and lam > 0:
            # Either the server ignored `knn_lm` for prompt tokens or nothing was retrieved.
            warnings.append(f"{label}: perplexity identical to base; is knn_lm applied to prompt logprobs?")
    sweep = [label for label in rows if label != "base" and rows[label]["reduction"]]
    best = max(sweep, key=lambda label: rows[label]["reduction"]["reduction"]) if sweep else None
    sanity = None
    if best and args.sanity_docs > 0:
        picked = random.Random(f"knn-sanity-{args.seed}").sample(train, k=min(args.sanity_docs, len(train)))
        s_base = measure(picked, None, "sanity base")
        s_best = measure(picked, rows[best]["knn_lm"], f"sanity {best}")
        per_doc["sanity_base"], per_doc["sanity_best"] = s_base["per_doc"], s_best["per_doc"]
        sanity = {"setting": best, "doc_ids": [d["id"] for d in picked],
                  "base": _row(s_base, None, args), "best": _row(s_best, s_base, args)}
    best_red = rows[best]["reduction"] if best else None
    doc = {"tool": "bench.knn_quality",
           "command": "python -m bench.knn_quality " + shlex.join(sys.argv[1:]),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": round(time.time() - started, 1),
           "machine": machine_info(),
           "note": "Default model: SmolLM2-135M-Instruct dequantised from GGUF Q4_1. Machine info is the "
                   "client's; the server may run elsewhere. Perplexity over all scored tokens (the first "
                   "token of each request has no logprob); intervals: 95 % bootstrap over documents, "
                   "paired for reductions.",
           "server": {"base_url": args.base_url, "model": base["model"], "form": base["form"]},
           "data": {"generator": "bench.encyclopedia", "source": source, "seed": args.seed,
                    "split_seed": args.split_seed, "num_entities": args.num_entities, "held_out": args.held_out,
                    "train_docs": len(train), "eval_docs": len(evals)},
           "seeds": {"encyclopedia": args.seed, "split": args.split_seed, "bootstrap": args.bootstrap_seed,
                     "sanity_sample": f"knn-sanity-{args.seed}"},
           "datastore": args.datastore,
           "sweep": {"lambda": args.lambdas, "k": args.ks, "temperature": args.temperatures},
           "results": rows, "best": best, "best_reduction": best_red,
           "goal": {"relative_reduction": GOAL, "met": bool(best_red and best_red["reduction"] >= GOAL),
                    "met_at_lower_ci": bool(best_red and best_red["ci95"][0] >= GOAL)},
           "sanity": sanity, "warnings": warnings}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    write_jsonl(args.out.with_name(args.out.stem + "_per_doc.jsonl"),
                ({"setting": label, **r} for label, rs in per_doc.items() for r in rs), fields=None)
    plot(doc, args.out.with_suffix(".png"))
    return doc


def plot(doc: dict, path: Path) -> None:
    """Grouped bars: relative reduction per (k, τ), one bar per λ, paired 95 % error bars; goal line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep, rows = doc["sweep"], doc["results"]
    groups = list(itertools.product(sweep["k"], sweep["temperature"]))
    width = 0.8 / len(sweep["lambda"])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(groups) + 1.5), 3.6))
    for j, lam in enumerate(sweep["lambda"]):
        xs, ys, lo, hi = [], [], [], []
        for i, (k, temp) in enumerate(groups):
            red = (rows.get(f"lambda{lam:g}_k{k}_t{temp:g}") or {}).get("reduction")
            if not red:
                continue
            xs.append(i + (j - (len(sweep["lambda"]) - 1) / 2) * width)
            ys.append(100 * red["reduction"])
            lo.append(100 * (red["reduction"] - red["ci95"][0]))
            hi.append(100 * (red["ci95"][1] - red["reduction"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=f"λ={lam:g}")
    if doc.get("best"):
        best = rows[doc["best"]]
        i = groups.index((best["knn_lm"]["k"], best["knn_lm"]["temperature"]))
        j = sweep["lambda"].index(best["knn_lm"]["lambda"])
        ax.annotate("best", (i + (j - (len(sweep["lambda"]) - 1) / 2) * width, 100 * best["reduction"]["ci95"][1]),
                    ha="center", va="bottom", fontsize=7)
    ax.axhline(100 * doc["goal"]["relative_reduction"], ls="--", c="gray", lw=1,
               label=f"goal {doc['goal']['relative_reduction']:.0%}")
    ax.axhline(0, c="black", lw=0.5)
    ax.set_xticks(range(len(groups)), [f"k={k}\nτ={t:g}" for k, t in groups], fontsize=8)
    ax.set_ylabel("perplexity reduction vs base, % (95% CI)")
    base, s = rows["base"], doc.get("sanity")
    title = (f"kNN-LM on held-out encyclopedia docs: base ppl {base['ppl']:.2f}, N={base['n_tokens']} tokens, "
             f"{doc['data']['eval_docs']} docs, seed {doc['data']['seed']}")
    if s and s["best"].get("reduction"):
        title += f"\nsanity ({len(s['doc_ids'])} train docs, {s['setting']}): {s['base']['ppl']:.2f} → " \
                 f"{s['best']['ppl']:.2f} ({100 * s['best']['reduction']['reduction']:.0f}% lower)"
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot is not None:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
    elif args.write_data is not None:
        write_data(args)
    else:
        doc = run(args)
        for label, r in doc["results"].items():
            red = r.get("reduction")
            print(f"{label}: ppl {r['ppl']:.4f} N={r['n_tokens']}"
                  + (f", reduction {100 * red['reduction']:.1f}% (95% {100 * red['ci95'][0]:.1f}..{100 * red['ci95'][1]:.1f})"
                     if red else ""))
        print(f"best: {doc['best']}, goal {GOAL:.0%} met: {doc['goal']['met']}")
        for w in doc["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
