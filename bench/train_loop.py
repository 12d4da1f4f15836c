"""The full offline-alignment loop on the real model, measured on held-out verifiable prompts.

Run (needs a running alignserve server that can load adapters; not part of the test suite):
    alignserve serve --port 8000 [--adapter-root bench/results/train_loop]   # in another shell
    python -m bench.train_loop --server http://localhost:8000/v1 --output bench/results/train_loop
or let the script start the server itself with `--serve-cmd "alignserve serve --port {port} ..."`.

Steps: (1) `data instructions` (split by task template); (2) held-out pass rate of the base,
greedy; (3) `data preferences` on the train prompts (N samples each, checker-labelled);
(4) `train dpo` on those pairs; (5) `POST /v1/load_lora_adapter`; (6) held-out pass rate of the
adapter, greedy, on the same prompts. Out: `<output>/train_loop_<stamp>.json` with n, pass rates
with 95% Wilson intervals, the paired win/loss counts, per-constraint rates, DPO metrics and
timings. NOTE: the default model is SmolLM2-135M-Instruct dequantised from Q4_1; say so when
quoting these numbers. Does not: tune hyperparameters or run the other trainers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path as _Path

# NOTE: run as a file, Python puts bench/ first on sys.path, where bench/datasets.py would
# shadow HF `datasets`; the repo root goes there instead.
if sys.path and _Path(sys.path[0]).resolve() == _Path(__file__).resolve().parent:
    sys.path[0] = str(_Path(__file__).resolve().parent.parent)
import asyncio
import dataclasses
import json
import shlex
import subprocess
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adapters.train.preferences import load_adapter, wilson  # noqa: F401 -- re-exported for the benches


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", default="http://localhost:8000/v1", help="OpenAI-compatible base URL")
    p.add_argument("--model", default=None, help="base model name on the server (default: first listed)")
    p.add_argument("--serve-cmd", default=None,
                   help="start the server with this command ({port}, {root} are filled in); default: use --server")
    p.add_argument("--port", type=int, default=8011, help="port for --serve-cmd")
    p.add_argument("--base", default=None, help="local base dir for training (default: the default model)")
    p.add_argument("--output", type=Path, default=Path("bench/results/train_loop"))
    p.add_argument("--n-prompts", type=int, default=600, help="instruction prompts, train + held-out")
    p.add_argument("--samples", type=int, default=8, help="responses per train prompt for preferences")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=16)
    return p.parse_args(argv)


def summarise(records: Sequence[dict[str, Any]], responses: Sequence[str]) -> dict[str, Any]:
    """Pass rate (all constraints met) with its interval, and per-constraint pass rates."""
    from adapters.train.constraints import check_all

    passed, per = [], defaultdict(lambda: [0, 0])
    for rec, text in zip(records, responses, strict=True):
        results = check_all(rec["constraints"], text)
        passed.append(all(results))
        for c, ok in zip(rec["constraints"], results, strict=True):
            per[c["id"]][0] += int(ok)
            per[c["id"]][1] += 1
    n, k = len(passed), sum(passed)
    return {"n": n, "passed": k, "pass_rate": k / max(1, n), "wilson95": wilson(k, n),
            "per_constraint": {cid: {"passed": a, "n": b, "rate": a / b} for cid, (a, b) in sorted(per.items())},
            "all_passed": passed}


def paired(before: Sequence[bool], after: Sequence[bool]) -> dict[str, int]:
    """Per-prompt changes: fixed (fail -> pass) and broken (pass -> fail)."""
    return {"fixed": sum(not b and a for b, a in zip(before, after, strict=True)),
            "broken": sum(b and not a for b, a in zip(before, after, strict=True))}


def wait_ready(server: str, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.rstrip("/") + "/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{server} not ready after {timeout_s}s")


def run(args: argparse.Namespace) -> Path:
    from adapters.train.common import LoraOptions, TrainOptions
    from adapters.train.data import write_jsonl
    from adapters.train.dpo import train_dpo
    from adapters.train.instructions import generate_instructions
    from adapters.train.preferences import SamplingConfig, build_preferences, evaluate_pass_rate

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    work = (args.output / f"run_{stamp}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    server_proc = None
    server = args.server
    if args.serve_cmd:
        server = f"http://127.0.0.1:{args.port}/v1"
        cmd = shlex.split(args.serve_cmd.format(port=args.port, root=work))
        server_proc = subprocess.Popen(cmd)
    try:
        wait_ready(server)
        records = [r.to_json() for r in generate_instructions(args.n_prompts, seed=args.seed)]
        train = [r for r in records if r["split"] == "train"]
        heldout = [r for r in records if r["split"] == "heldout"]
        write_jsonl(work / "instructions_train.jsonl", train)
        write_jsonl(work / "instructions_heldout.jsonl", heldout)

        greedy = SamplingConfig(server=server, model=args.model, temperature=0.0, top_p=1.0,
                                max_tokens=args.max_tokens, seed=args.seed, concurrency=args.concurrency)
        t = time.perf_counter()
        before = asyncio.run(evaluate_pass_rate(heldout, greedy))
        timings["eval_before_s"] = time.perf_counter() - t

        t = time.perf_counter()
        sampling = SamplingConfig(server=server, model=args.model, n=args.samples, temperature=args.temperature,
                                  max_tokens=args.max_tokens, seed=args.seed, concurrency=args.concurrency)
        pairs, pref_stats = asyncio.run(build_preferences(train, sampling))
        write_jsonl(work / "preferences.jsonl", pairs)
        timings["preferences_s"] = time.perf_counter() - t

        t = time.perf_counter()
        adapter = work / "dpo_adapter"
        result = train_dpo(TrainOptions(data=work / "preferences.jsonl", output=adapter, base=args.base,
                                        lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                                        seed=args.seed, lora=LoraOptions(r=args.lora_r, alpha=2 * args.lora_r)),
                           beta=args.beta)
        timings["train_dpo_s"] = time.perf_counter() - t

        name = f"train-loop-dpo-{stamp}"
        load_adapter(server, name, adapter)
        t = time.perf_counter()
        after = asyncio.run(evaluate_pass_rate(heldout, dataclasses.replace(greedy, model=name)))
        timings["eval_after_s"] = time.perf_counter() - t
    finally:
        if server_proc is not None:
            server_proc.terminate()
            server_proc.wait(timeout=60)

    s_before, s_after = summarise(heldout, before["responses"]), summarise(heldout, after["responses"])
    out = {
        "note": "base = SmolLM2-135M-Instruct dequantised from Q4_1 unless --base says otherwise",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "server": server, "base_model_on_server": before["model"], "adapter": str(adapter),
        "counts": {"train_prompts": len(train), "heldout_prompts": len(heldout), **pref_stats},
        "before": {k: v for k, v in s_before.items() if k != "all_passed"},
        "after": {k: v for k, v in s_after.items() if k != "all_passed"},
        "paired": paired(s_before["all_passed"], s_after["all_passed"]),
        "dpo": {"steps": result.steps, "metrics": result.metrics},
        "timings_s": timings,
    }
    path = args.output / f"train_loop_{stamp}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    (work / "responses.json").write_text(json.dumps({"before": before["responses"], "after": after["responses"]}))
    print(f"held-out pass rate: before {s_before['pass_rate']:.3f} {s_before['wilson95']}, "
          f"after {s_after['pass_rate']:.3f} {s_after['wilson95']} (n={s_before['n']}); wrote {path}")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
