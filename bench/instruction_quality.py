"""`alignserve bench quality --suite instructions` (also `python -m bench.instruction_quality`):
what each method and each trained adapter buys on verifiable instructions (issue 14, suite 1).

Data: the seeded IFEval-style prompts of adapters/train/instructions.py, split by TEMPLATE:
adapters learn from train templates, every arm is measured on held-out templates (constraints a
reply of `max_tokens` can meet). Training data is on-policy: `samples` replies per train prompt
from the served base at T = 0.8, scored by the checkers; a pair is the best vs the worst reply
(adapters/train/preferences.build_preferences). From those pairs our own trainer (the real CLI,
`alignserve train sft|dpo|rm|arm`, in subprocesses) makes four LoRA adapters: SFT on the chosen
replies that pass every checker (rejection-sampling SFT; all chosen replies if fewer than 2
pass, as `sft_data` records), DPO, a reward model (score head) and a GenARM ARM (beta_r 0.05,
the CLI's default; the plan's 0.5 is not swept); they are
hot-loaded into one `alignserve serve` and every arm runs over HTTP with the `openai` client.

Arms: base, SFT, DPO and GenARM (alpha 0.5 / 1 / 2) greedy; best-of-N with the RM at N = 1, 4,
16 and the checker as an oracle at N = 4, 16, all derived from the first N of the same 16
candidates per prompt (T = 0.8; the server's own best-of-16 pick is checked to equal the
derived one); reward-guided block search at T = 0.8 and RAIN (evaluator = the RM; its own
sampling: top-k token sets and T = 1 rollouts, whatever the request's temperature; fewer
prompts: RAIN is slow on CPU). Per arm, with n and Wilson 95 % intervals: pass rate (all
constraints met), its paired difference from DPO on the same prompts (bootstrap 95 %), mean
constraint fraction, reply length in tokens, and drift: log-prob per reply token under the base
model, pooled over the arm's replies, end-of-turn excluded (echoed prompt logprobs; greedy arms
sit high on it by construction, sampled ones lower). Also the RM's and the ARM's pairwise
accuracy on held-out candidate pairs (first 4 candidates of each held-out prompt, checker
scores differ; the ARM's reward is its summed log-prob of the reply and its end-of-turn tokens,
as trained, beta_r times which is r), with a bootstrap over prompts beside Wilson's interval.
Writes JSON (command, machine, every reply) and a PNG beside it.
"""
from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":  # see bench/methods_latency.py
    sys.path[0] = str(REPO)
if str(REPO) not in sys.path:  # `alignserve bench quality` from anywhere: tests.conftest starts the server
    sys.path.insert(0, str(REPO))

from bench.instruction_scoring import (best_of_first, candidate_pairs, chat_continuation, chat_prefix,  # noqa: E402
                                       grade, paired_difference, pairwise_accuracy, reply_logprobs, summarise)
from bench.plots import rate_bars  # noqa: E402
from bench.rain_quality import instruction_split, run_arm, shown, train_with_cli, write_adapter_root  # noqa: E402
from bench.suite import MODEL, run_suite  # noqa: E402
from bench.train_loop import load_adapter  # noqa: E402

SIZES = {
    "full": dict(n_train=160, n_eval=60, n_rain=16, samples=6, max_tokens=48, best_of=[1, 4, 16], oracle=[4, 16],
                 alphas=[0.5, 1.0, 2.0], beam_width=4, block_tokens=12, pair_candidates=4, epochs=2.0,
                 max_steps=-1, concurrency=8, rain={}),
    "quick": dict(n_train=16, n_eval=3, n_rain=1, samples=4, max_tokens=12, best_of=[1, 2, 4], oracle=[4],
                  alphas=[1.0], beam_width=2, block_tokens=4, pair_candidates=4, epochs=1.0, max_steps=1,
                  concurrency=4, rain={"max_iterations": 2, "min_iterations": 1, "token_set_size": 2,
                                       "token_set_lengths": [1, 2], "rollout_max_tokens": 2}),
}
ROLES = ("sft", "dpo", "rm", "arm")  # adapter names: iq-<role>


def request_arms(size: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Request bodies of the arms the server runs (the best-of-N arms derive from `best_of_16`)."""
    greedy = {"max_tokens": size["max_tokens"], "temperature": 0.0}
    sampled = {"max_tokens": size["max_tokens"], "temperature": 0.8}
    n_max = max(size["best_of"])
    blocks = -(-size["max_tokens"] // size["block_tokens"])
    return {"base": greedy, "sft": {**greedy, "model": "iq-sft"}, "dpo": {**greedy, "model": "iq-dpo"},
            **{f"genarm_{a:g}": {**greedy, "genarm": {"reward_model": "iq-arm", "alpha": a}} for a in size["alphas"]},
            f"best_of_{n_max}": {**sampled, "best_of": n_max, "reward_model": "iq-rm"},
            "block_search": {**sampled, "search": {"reward_model": "iq-rm", "beam_width": size["beam_width"],
                                                   "block_tokens": size["block_tokens"], "max_blocks": blocks}},
            "rain": {**sampled, "rain": {"evaluator": "iq-rm", **size["rain"]}}}


def training_rows(pairs: list[dict]) -> tuple[dict[str, list[dict]], str]:
    """SFT: prompt -> the chosen reply where it passes every checker (all chosen if fewer than 2
    do); DPO / RM / ARM: the pairs themselves. Also which SFT data it is."""
    prefs = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
    passing = [p for p in pairs if p["chosen_score"] == 1.0]
    sft_data = "passing" if len(passing) >= 2 else "chosen (fewer than 2 pass)"
    sft = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in (passing if len(passing) >= 2 else pairs)]
    return {"sft": sft, "dpo": prefs, "rm": prefs, "arm": prefs}, sft_data


def add_logprobs(base_url: str, tokenizer: Any, arms: dict[str, list[dict]], concurrency: int) -> None:
    """Each reply's base-model log-prob and token count (drift and length), in place."""
    rows = [r for arm in arms.values() for r in arm]
    prefixes = [chat_prefix(tokenizer, r["prompt"]) for r in rows]
    scored = asyncio.run(reply_logprobs(base_url, MODEL, prefixes, [r["text"] for r in rows], concurrency))
    for row, (logprob, n) in zip(rows, scored, strict=True):
        row["base_logprob"], row["reply_tokens"] = logprob, n


def run(args, size: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from adapters.train.preferences import SamplingConfig, build_preferences
    from server.models.default_model import ensure_default_model
    from tests.conftest import ServerProcess

    train, heldout = instruction_split(size["n_train"], size["n_eval"], args.seed)
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    root = write_adapter_root(args.adapter_root) / "instruction_quality"
    root.mkdir(exist_ok=True)
    bodies = request_arms(size)
    n_max = max(size["best_of"])
    srv = ServerProcess("--dtype", args.dtype, "--num-kv-blocks", "8192", "--max-num-seqs", "128",
                        "--adapter-root", str(root.parent))
    results, timings, adapters = {}, {}, {}
    try:
        url = srv.base_url + "/v1"
        t = time.perf_counter()
        sampling = SamplingConfig(server=url, model=MODEL, n=size["samples"], temperature=0.8, top_p=1.0,
                                  max_tokens=size["max_tokens"], seed=args.seed, concurrency=size["concurrency"])
        pairs, pref_stats = asyncio.run(build_preferences(train, sampling))
        timings["preferences_s"] = time.perf_counter() - t
        if len(pairs) < 2:
            raise RuntimeError(f"only {len(pairs)} preference pair(s) from {len(train)} prompts; raise the sizes")
        train_sets, sft_data = training_rows(pairs)
        for role, rows in train_sets.items():
            adapters[role] = train_with_cli(role, rows, root / role, size["epochs"], size["max_steps"], args.seed,
                                            root / f"{role}.jsonl")
            load_adapter(url, f"iq-{role}", root / role)
        for name, body in bodies.items():
            records = heldout[:size["n_rain"]] if name == "rain" else heldout
            t = time.perf_counter()
            rows = asyncio.run(run_arm(srv.base_url, [r["prompt"] for r in records], body, size["concurrency"],
                                       args.seed))
            timings[name + "_s"] = time.perf_counter() - t
            grade(rows, records)
            results[name] = {"options": body, "rows": rows}
            print(name, f"pass {sum(r['passed'] for r in rows)}/{len(rows)}", flush=True)
        bon = results[f"best_of_{n_max}"]["rows"]
        derived = {f"best_of_{n}_rm": best_of_first(bon, n, oracle=False) for n in size["best_of"]}
        derived |= {f"best_of_{n}_oracle": best_of_first(bon, n, oracle=True) for n in size["oracle"]}
        if [r["text"] for r in derived[f"best_of_{n_max}_rm"]] != [r["text"] for r in bon]:
            raise RuntimeError("the server's best-of-N pick differs from the highest-reward candidate")
        measured = {k: v["rows"] for k, v in results.items() if k != f"best_of_{n_max}"} | derived
        t = time.perf_counter()
        add_logprobs(srv.base_url, tokenizer, measured, size["concurrency"])
        pairs_eval = candidate_pairs(bon, size["pair_candidates"])
        prefixes = [chat_prefix(tokenizer, p["prompt"]) for p in pairs_eval]
        for side in ("better", "worse"):
            turns = [chat_continuation(tokenizer, p["prompt"], p[side]) for p in pairs_eval]
            scored = asyncio.run(reply_logprobs(srv.base_url, "iq-arm", prefixes, turns, size["concurrency"]))
            for p, (logprob, _) in zip(pairs_eval, scored, strict=True):
                p["arm_" + side] = logprob
        timings["logprobs_s"] = time.perf_counter() - t
    finally:
        srv.stop()
    arms_doc = {name: {"options": results.get(name, {}).get("options", {"derived_from": f"best_of_{n_max}"}),
                       "summary": summarise(rows), "rows": rows} for name, rows in measured.items()}
    for name, arm in arms_doc.items():
        arm["summary"]["vs_dpo"] = paired_difference(arm["rows"], arms_doc["dpo"]["rows"], args.seed)
    return {"preferences": {**pref_stats, "chosen_passing": sum(p["chosen_score"] == 1.0 for p in pairs),
                            "sft_data": sft_data},
            "adapters": {role: {**meta, "adapter": shown(root / role), "name": f"iq-{role}"}
                         for role, meta in adapters.items()},
            "pairwise_accuracy": {"pairs": len(pairs_eval),
                                  "rm": pairwise_accuracy(pairs_eval, "rm_better", "rm_worse", args.seed),
                                  "arm": pairwise_accuracy(pairs_eval, "arm_better", "arm_worse", args.seed)},
            "eval_templates": sorted({r["template"] for r in heldout}),
            "train_templates": sorted({r["template"] for r in train}),
            "arms": arms_doc, "timings_s": timings}


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["arms"])
    s = [doc["arms"][a]["summary"] for a in names]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rate_bars(axes[0], names, [v["pass"] for v in s])
    axes[0].set_title("held-out pass rate, Wilson 95 % (n per bar: " +
                      "/".join(sorted({str(v['pass']['n']) for v in s})) + ")", fontsize=9)
    axes[1].bar(names, [v.get("base_logprob_per_token") or 0 for v in s])
    axes[1].set_title("drift: base log-prob per reply token", fontsize=9)
    axes[2].bar(names, [v.get("reply_tokens_mean", 0) for v in s])
    axes[2].set_title("reply length (tokens)", fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    acc = doc["pairwise_accuracy"]
    fig.suptitle(f"verifiable instructions, held-out templates; {doc['model']} ({doc['served_dtype']}), seed "
                 f"{doc['seed']}; RM pairwise {acc['rm']['rate']:.3f}, ARM {acc['arm']['rate']:.3f} on {acc['pairs']} "
                 f"held-out pairs; {doc['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    run_suite("instruction_quality", __doc__.splitlines()[0], SIZES, run, plot,
              "request i seeded seed + i; intervals: Wilson 95 %; held-out prompts: templates no adapter saw in "
              "training.", lambda doc: {"pass": {k: v["summary"]["pass"]["rate"] for k, v in doc["arms"].items()}},
              argv)


if __name__ == "__main__":
    main()
