"""`python -m bench.search_vs_bon`: reward-guided block search against best-of-N at equal compute,
on the held-out verifiable-instruction prompts.

Both spend the same number of sampled tokens per request: best-of-N draws N replies of
`max_tokens`; block search (`search: {reward_model, beam_width, block_tokens, max_blocks}`)
draws beam_width branches of block_tokens per round for max_blocks rounds, with
beam_width * block_tokens * max_blocks == N * max_tokens (checked). Both score with the same
reward model, a LoRA + score head trained here by our own trainer (`alignserve train rm`) on
on-policy, checker-labelled preferences (adapters/train/preferences.build_preferences: N
samples per TRAIN-split prompt from this server, chosen = most constraints met, rejected =
fewest), written under bench/results/.adapters/ (not in git) and rebuilt by this script.
Baselines: one greedy and one sampled reply (T = 1), as `best_of: 1` so that the RM scores them.

Everything runs over HTTP with the `openai` client (`extra_body`) against one `alignserve serve`.
Reported per arm, with n and Wilson 95 % intervals: pass rate (every constraint met, by the
checkers of adapters/train/constraints.py), mean fraction of constraints met, mean RM score of
the returned reply, generated tokens per request (usage: every branch and candidate), p50
latency (all arms at the same concurrency); the oracle pass rate of best-of-N (any candidate
passes: what a perfect RM would reach), the paired best-of-N / block-search outcomes per prompt,
and the RM's pairwise accuracy on held-out best-of-N candidates with different checker scores.
Writes JSON (command, machine, every reply) and a PNG beside it.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":  # see bench/methods_latency.py
    sys.path[0] = str(REPO)

from bench.plots import rate_bars  # noqa: E402
from bench.rain_quality import (instruction_split, rate, run_arm, shown, train_reward_model,  # noqa: E402
                                write_adapter_root)
from bench.suite import MODEL, run_suite  # noqa: E402
from bench.train_loop import load_adapter  # noqa: E402

SIZES = {
    "full": dict(n_train=160, n_eval=100, samples=4, best_of=4, beam_width=4, block_tokens=12, max_blocks=4,
                 epochs=2.0, max_steps=-1, concurrency=8),
    "quick": dict(n_train=8, n_eval=3, samples=4, best_of=2, beam_width=2, block_tokens=4, max_blocks=2,
                  epochs=1.0, max_steps=1, concurrency=4),
}


def arms(size: dict[str, Any], rm: str) -> dict[str, dict[str, Any]]:
    """Request bodies per arm; max_tokens is the reply length every arm returns."""
    max_tokens = size["block_tokens"] * size["max_blocks"]
    search = {k: size[k] for k in ("beam_width", "block_tokens", "max_blocks")}
    if size["beam_width"] * size["block_tokens"] * size["max_blocks"] != size["best_of"] * max_tokens:
        raise ValueError("equal compute needs beam_width * block_tokens * max_blocks == best_of * max_tokens")
    return {"greedy": {"max_tokens": max_tokens, "temperature": 0.0, "best_of": 1, "reward_model": rm},
            "sample": {"max_tokens": max_tokens, "temperature": 1.0, "best_of": 1, "reward_model": rm},
            f"best_of_{size['best_of']}": {"max_tokens": max_tokens, "temperature": 1.0,
                                           "best_of": size["best_of"], "reward_model": rm},
            "block_search": {"max_tokens": max_tokens, "temperature": 1.0, "search": {"reward_model": rm, **search}}}


def reply_reward(alignment: dict[str, Any]) -> float:
    """The RM's score of the returned reply, from the method's own report."""
    if "best_of_n" in alignment:
        report = alignment["best_of_n"]
        return report["candidates"][report["chosen"][0]]["reward"]
    last = alignment["search"]["blocks"][-1]  # the last block is scored on the whole reply
    return last["candidates"][last["chosen"]]["reward"]


def grade(rows: list[dict], records: list[dict]) -> None:
    """Checker verdicts and the RM score of each reply, in place."""
    from adapters.train.constraints import check_all, score

    for row, rec in zip(rows, records, strict=True):
        row["constraints"] = rec["constraints"]
        row["passed"] = all(check_all(rec["constraints"], row["text"]))
        row["score"] = score(rec["constraints"], row["text"])
        row["reward"] = reply_reward(row["alignment"])
        if "best_of_n" in row["alignment"]:
            for cand in row["alignment"]["best_of_n"]["candidates"]:
                cand["score"] = score(rec["constraints"], cand["text"])
                cand["passed"] = all(check_all(rec["constraints"], cand["text"]))


def summarise_arm(rows: list[dict]) -> dict[str, Any]:
    return {"pass": rate(rows, "passed"), "constraint_fraction_mean": statistics.fmean(r["score"] for r in rows),
            "reward_mean": statistics.fmean(r["reward"] for r in rows),
            "reward_sd": statistics.pstdev(r["reward"] for r in rows),
            "completion_tokens_mean": statistics.fmean(r["completion_tokens"] for r in rows),
            "latency_p50_s": statistics.median(r["latency_s"] for r in rows)}


def candidate_pairs(rows: list[dict]) -> dict[str, Any]:
    """RM pairwise accuracy on held-out best-of-N candidates of one prompt whose checker scores
    differ (the better-scoring one should get the higher reward; exact reward ties count wrong)."""
    pairs = []
    for row in rows:
        for a, b in itertools.combinations(row["alignment"]["best_of_n"]["candidates"], 2):
            if a["score"] != b["score"]:
                hi, lo = (a, b) if a["score"] > b["score"] else (b, a)
                pairs.append({"correct": hi["reward"] > lo["reward"]})
    return rate(pairs, "correct")


def paired(bon: list[dict], search: list[dict]) -> dict[str, int]:
    outcome = {"both": 0, "only_best_of_n": 0, "only_block_search": 0, "neither": 0}
    for a, b in zip(bon, search, strict=True):
        key = "both" if a["passed"] and b["passed"] else "only_best_of_n" if a["passed"] else \
            "only_block_search" if b["passed"] else "neither"
        outcome[key] += 1
    return outcome


def run(args, size: dict[str, Any]) -> dict[str, Any]:
    from adapters.train.preferences import SamplingConfig, build_preferences
    from tests.conftest import ServerProcess

    train, heldout = instruction_split(size["n_train"], size["n_eval"], args.seed)
    root = write_adapter_root(args.adapter_root)
    rm_dir = root / "search_rm"
    bodies = arms(size, "search-rm")
    max_tokens = bodies["greedy"]["max_tokens"]
    srv = ServerProcess("--dtype", args.dtype, "--num-kv-blocks", "4096", "--max-num-seqs", "128",
                        "--adapter-root", str(root))
    results, timings = {}, {}
    try:
        t = time.perf_counter()
        sampling = SamplingConfig(server=srv.base_url + "/v1", model=MODEL, n=size["samples"], temperature=1.0,
                                  top_p=1.0, max_tokens=max_tokens, seed=args.seed, concurrency=size["concurrency"])
        pairs, pref_stats = asyncio.run(build_preferences(train, sampling))
        timings["preferences_s"] = time.perf_counter() - t
        if len(pairs) < 2:
            raise RuntimeError(f"only {len(pairs)} preference pair(s) from {len(train)} prompts; raise the sizes")
        rm = train_reward_model(pairs, rm_dir, size["epochs"], size["max_steps"], args.seed)
        load_adapter(srv.base_url + "/v1", "search-rm", rm_dir)
        prompts = [r["prompt"] for r in heldout]
        for name, body in bodies.items():
            t = time.perf_counter()
            rows = asyncio.run(run_arm(srv.base_url, prompts, body, size["concurrency"], args.seed))
            timings[name + "_s"] = time.perf_counter() - t
            grade(rows, heldout)
            results[name] = {"options": body, "rows": rows, "summary": summarise_arm(rows)}
            print(name, json.dumps({k: v.get("rate", v) if isinstance(v, dict) else v
                                    for k, v in results[name]["summary"].items()}), flush=True)
    finally:
        srv.stop()
    bon = results[f"best_of_{size['best_of']}"]
    oracle = [{"any": any(c["passed"] for c in r["alignment"]["best_of_n"]["candidates"])} for r in bon["rows"]]
    plain = results["sample"]["summary"]["latency_p50_s"]
    for arm in results.values():
        arm["summary"]["latency_vs_sample"] = arm["summary"]["latency_p50_s"] / plain
    return {"reward_model": {**rm, "adapter": shown(rm_dir), "preferences": pref_stats,
                             "heldout_candidate_pairwise_accuracy": candidate_pairs(bon["rows"])},
            "compute": {"tokens_per_request_budget": size["best_of"] * max_tokens, "max_tokens": max_tokens},
            "eval_templates": sorted({r["template"] for r in heldout}),
            "train_templates": sorted({r["template"] for r in train}),
            "oracle_best_of_n_pass": rate(oracle, "any"),
            "paired_best_of_n_vs_block_search": paired(bon["rows"], results["block_search"]["rows"]),
            "arms": results, "timings_s": timings}


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["arms"])
    s = [doc["arms"][a]["summary"] for a in names]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    rate_bars(axes[0], names, [v["pass"] for v in s])
    o = doc["oracle_best_of_n_pass"]
    axes[0].axhline(o["rate"], ls="--", c="gray", lw=1, label=f"oracle best-of-N {o['rate']:.2f}")
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"held-out pass rate (n={s[0]['pass']['n']}), Wilson 95 %", fontsize=9)
    axes[1].bar(names, [v["reward_mean"] for v in s])
    axes[1].set_title("mean RM score of the reply", fontsize=9)
    axes[2].bar(names, [v["latency_vs_sample"] for v in s])
    for i, v in enumerate(s):
        axes[2].text(i, v["latency_vs_sample"], f"{v['completion_tokens_mean']:.0f} tok", ha="center",
                     va="bottom", fontsize=7)
    axes[2].set_title("p50 latency / one sample (generated tokens)", fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(f"block search vs best-of-N at {doc['compute']['tokens_per_request_budget']} tokens per request, "
                 f"{doc['model']} ({doc['dtype']}), seed {doc['seed']}; {doc['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    run_suite("search_vs_bon", __doc__.splitlines()[0], SIZES, run, plot,
              "request i seeded seed + i; intervals: Wilson 95 %; latency: per request, every arm at the same "
              "concurrency; held-out prompts: templates never seen in the RM's training.",
              lambda doc: {"rm_heldout_pairs": doc["reward_model"]["heldout_candidate_pairwise_accuracy"]}, argv)


if __name__ == "__main__":
    main()
