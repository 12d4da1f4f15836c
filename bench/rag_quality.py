"""`python -m bench.rag_quality`: answer match, retrieval recall@k and citation accuracy of RAG over HTTP.

Against a running server (any OpenAI-compatible one with alignserve's `/v1/indexes` routes and
`rag` request option): builds the seeded invented fact set (`bench.rag_facts`), re-creates a
collection named after the seed, uploads one passage per entity, then asks every question
greedily (temperature 0) closed-book and with `rag={"index", "top_k": k, "mode"}` for each k and
mode, plus the reader adapter (`--reader-adapter NAME`, generate mode) if given. A search-only
pass over `/v1/indexes/{name}/search` gives the retriever's recall@k without generation.

Per configuration, each with n and a 95% Wilson interval, overall and split literal/paraphrased:
- answer match: the normalised answer (SQuAD-style: lowercase, no punctuation, no articles,
  single spaces) occurs in the normalised reply at word boundaries; strict exact match too;
- recall@k: the gold doc id is among `alignment.rag.passages[*].doc_id`;
- citations: the share of replies citing at all, and among those, the share whose
  `alignment.rag.citations` include the gold doc, contain the answer, or name the gold doc only.
A request that fails counts as a miss everywhere (and in `errors`).

    python -m bench.rag_quality --base-url http://127.0.0.1:8000/v1 --out bench/results/rag_quality.json
    python -m bench.rag_quality --dump-questions bench/results/rag_facts   # JSONL only, no server

NOTE: the default model is SmolLM2-135M-Instruct dequantised from Q4_1; say so when quoting.
Writes the JSON, `<out>.png` (bars with Wilson error bars) and `<out stem>_records.jsonl`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path as _Path

# NOTE: run as a file, Python puts bench/ first on sys.path, where bench/datasets.py would
# shadow HF `datasets`; the repo root goes there instead.
if sys.path and _Path(sys.path[0]).resolve() == _Path(__file__).resolve().parent:
    sys.path[0] = str(_Path(__file__).resolve().parent.parent)
import json
import re
import shlex
import string
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.machine import machine_info
from bench.rag_facts import FactSet, assert_disjoint, dump, make_disjoint_set, make_fact_set, write_jsonl
from bench.train_loop import wilson

REPO = Path(__file__).resolve().parent.parent
ANSWER_GOAL = 0.80  # project goal for RAG answer match (shared/methods.md §8)
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}‘’“”–—]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD-style: lowercase, drop punctuation (so "48,200" == "48200"), drop articles, one space."""
    text = _PUNCT.sub("", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_match(reply: str, answer: str) -> bool:
    """The normalised answer occurs in the normalised reply as whole words ("Pim" not in "Pimbra")."""
    gold = normalize_answer(answer)
    return bool(gold) and f" {gold} " in f" {normalize_answer(reply)} "


def exact_match(reply: str, answer: str) -> bool:
    return normalize_answer(reply) == normalize_answer(answer)


def rate(successes: int, n: int) -> dict[str, Any]:
    lo, hi = wilson(successes, n)
    return {"k": successes, "n": n, "rate": successes / n if n else None, "wilson95": [lo, hi]}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--model", default=None, help="Base model name (default: the server's root model).")
    p.add_argument("--reader-adapter", default=None, help="Adapter name, sent as model= in generate mode.")
    p.add_argument("--num-entities", type=int, default=500, help="Documents indexed (distractors included).")
    p.add_argument("--num-questions", type=int, default=300, help="Questions asked (a prefix; 1/3 paraphrased).")
    p.add_argument("--ks", default="1,3,5")
    p.add_argument("--modes", default="generate,extractive")
    p.add_argument("--seed", type=int, default=0, help="Fact-set seed.")
    p.add_argument("--train-seed", type=int, default=1, help="Seed of the disjoint reader-training set.")
    p.add_argument("--train-size", type=int, default=1000, help="Entities in the disjoint training set.")
    p.add_argument("--index-type", default="auto", choices=("auto", "flat", "hnsw", "ivf"))
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=300.0, help="Seconds per request.")
    p.add_argument("--no-closed-book", action="store_true", help="Skip the closed-book baseline.")
    p.add_argument("--keep-index", action="store_true", help="Leave the collection on the server.")
    p.add_argument("--out", "--output", dest="out", type=Path, default=REPO / "bench/results/rag_quality.json")
    p.add_argument("--replot", type=Path, help="Only redraw the PNG of an existing results JSON.")
    p.add_argument("--dump-questions", type=Path, metavar="DIR",
                   help="Write the eval fact set and the disjoint training set as JSONL to DIR and exit.")
    args = p.parse_args(argv)
    args.ks = [int(k) for k in str(args.ks).split(",") if k]
    args.modes = [m for m in str(args.modes).split(",") if m]
    bad = set(args.modes) - {"generate", "extractive"}
    if bad or not args.ks or min(args.ks) < 1:
        p.error(f"--ks must be positive integers and --modes generate/extractive (got {args.ks}, {args.modes})")
    return args


def configurations(args: argparse.Namespace, base_model: str) -> list[dict[str, Any]]:
    """Label, model and rag option of every configuration asked."""
    configs = [] if args.no_closed_book else [{"label": "closed_book", "model": base_model, "rag": None}]
    if args.reader_adapter and not args.no_closed_book:
        # Control: the reader was trained on a disjoint set, so it too should know none of the facts.
        configs.append({"label": "reader_closed_book", "model": args.reader_adapter, "rag": None})
    for k in args.ks:
        for mode in args.modes:
            configs.append({"label": f"{mode}_k{k}", "model": base_model, "rag": {"top_k": k, "mode": mode}})
        if args.reader_adapter:
            configs.append({"label": f"reader_generate_k{k}", "model": args.reader_adapter,
                            "rag": {"top_k": k, "mode": "generate"}})
    return configs


def _passage_doc(p: dict) -> str | None:
    # doc_id is in the contract; fall back to the passage id's "doc#chunk" prefix.
    return p.get("doc_id") or (str(p["id"]).split("#")[0] if p.get("id") else None)


def score_record(record: dict, question: dict, doc_text: dict[str, str]) -> dict:
    """Add the per-reply verdicts to a raw record (reply text plus `alignment.rag`)."""
    reply, answer, gold = record.get("reply") or "", question["answer"], question["doc_id"]
    rag = record.get("rag") or {}
    retrieved = [_passage_doc(p) for p in rag.get("passages") or []]
    cited = [_passage_doc(c) for c in rag.get("citations") or []]
    record.update({
        "answer_match": record.get("error") is None and answer_match(reply, answer),
        "exact_match": record.get("error") is None and exact_match(reply, answer),
        "retrieved_docs": retrieved, "cited_docs": cited, "recalled": gold in retrieved,
        "cites": bool(cited), "cites_gold": gold in cited, "cites_only_gold": bool(cited) and set(cited) == {gold},
        "cited_has_answer": any(answer_match(doc_text.get(d or "", ""), answer) for d in cited),
        "invalid_citations": list(rag.get("invalid_citations") or []),
    })
    return record


def summarise(records: Sequence[dict], questions: dict[str, dict], with_rag: bool) -> dict[str, Any]:
    """Metrics of one configuration: overall, literal and paraphrased."""
    out: dict[str, Any] = {}
    for split, keep in (("all", lambda q: True), ("literal", lambda q: not q["paraphrased"]),
                        ("paraphrased", lambda q: q["paraphrased"])):
        rows = [r for r in records if keep(questions[r["question_id"]])]
        n = len(rows)
        s: dict[str, Any] = {"n": n, "errors": sum(r.get("error") is not None for r in rows),
                             "answer_match": rate(sum(r["answer_match"] for r in rows), n),
                             "exact_match": rate(sum(r["exact_match"] for r in rows), n)}
        if with_rag:
            citing = [r for r in rows if r["cites"]]
            s.update({"recall_at_k": rate(sum(r["recalled"] for r in rows), n),
                      "cites_any": rate(len(citing), n),
                      "citation_accuracy": rate(sum(r["cites_gold"] for r in citing), len(citing)),
                      "citation_has_answer": rate(sum(r["cited_has_answer"] for r in citing), len(citing)),
                      # Citing every passage that holds a short span (extractive "1") inflates the
                      # accuracy above; this one asks that nothing but the gold doc be cited.
                      "citation_only_gold": rate(sum(r["cites_only_gold"] for r in citing), len(citing)),
                      "invalid_citation_replies": rate(sum(bool(r["invalid_citations"]) for r in rows), n)})
        out[split] = s
    return out


def search_recall(records: Sequence[dict], questions: dict[str, dict], ks: Sequence[int]) -> dict[str, Any]:
    """Retriever-only recall@k from one search per question at the largest k."""
    out = {}
    for k in ks:
        per = {}
        for split, keep in (("all", lambda q: True), ("literal", lambda q: not q["paraphrased"]),
                            ("paraphrased", lambda q: q["paraphrased"])):
            rows = [r for r in records if keep(questions[r["question_id"]])]
            hits = sum(questions[r["question_id"]]["doc_id"] in r["ranked_docs"][:k] for r in rows)
            per[split] = {"n": len(rows), "recall_at_k": rate(hits, len(rows))}
        out[f"k{k}"] = per
    return out


class Runner:
    """The HTTP side: index routes over httpx, chat completions through the openai client."""

    def __init__(self, args: argparse.Namespace, transport: Any = None) -> None:
        import httpx
        import openai

        self.args = args
        self.root = args.base_url.rstrip("/")
        # `transport` lets the unit tests answer in-process (httpx.MockTransport).
        self.http = httpx.Client(base_url=self.root, timeout=args.timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {args.api_key}"})
        # NOTE: no retries, so a failing request shows up as an error instead of a silent re-send.
        self.client = openai.OpenAI(base_url=self.root, api_key=args.api_key, timeout=args.timeout, max_retries=0,
                                    http_client=httpx.Client(transport=transport) if transport else None)

    def models(self) -> dict:
        r = self.http.get("/models")
        r.raise_for_status()
        return r.json()

    def build_index(self, name: str, facts: FactSet) -> dict:
        r = self.http.delete(f"/indexes/{name}")
        if r.status_code not in (200, 404):
            r.raise_for_status()
        r = self.http.post("/indexes", json={"name": name, "index_type": self.args.index_type})
        r.raise_for_status()
        created = r.json()
        added_docs = added_passages = 0
        for start in range(0, len(facts.documents), 100):  # stays far below the body limit
            r = self.http.post(f"/indexes/{name}/documents", json={"documents": facts.documents[start:start + 100]})
            r.raise_for_status()
            body = r.json()
            added_docs += body.get("added_documents", 0)
            added_passages += body.get("added_passages", 0)
        if added_passages != len(facts.documents):
            print(f"warning: {added_passages} passages for {len(facts.documents)} documents", file=sys.stderr)
        return {"created": created, "added_documents": added_docs, "added_passages": added_passages}

    def search(self, name: str, question: dict, top_k: int) -> dict:
        rec = {"question_id": question["id"], "ranked_docs": [], "error": None}
        try:
            r = self.http.post(f"/indexes/{name}/search", json={"query": question["question"], "top_k": top_k})
            r.raise_for_status()
            rec["ranked_docs"] = [_passage_doc(p) for p in r.json().get("data", [])]
        except Exception as exc:  # noqa: BLE001 - recorded, counted as a miss
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        return rec

    def ask(self, config: dict, question: dict, index: str) -> dict:
        rec: dict[str, Any] = {"config": config["label"], "question_id": question["id"], "reply": None,
                               "rag": None, "error": None, "finish_reason": None}
        extra = {"rag": {"index": index, **config["rag"]}} if config["rag"] else None
        start = time.perf_counter()
        try:
            resp = self.client.chat.completions.create(
                model=config["model"], messages=[{"role": "user", "content": question["question"]}],
                temperature=0.0, max_tokens=self.args.max_tokens, extra_body=extra)
            rec["reply"] = resp.choices[0].message.content or ""
            rec["finish_reason"] = resp.choices[0].finish_reason
            rec["rag"] = (resp.to_dict().get("alignment") or {}).get("rag")
        except Exception as exc:  # noqa: BLE001 - recorded, counted as a miss
            status = getattr(exc, "status_code", None)
            rec["error"] = f"{type(exc).__name__}{f' {status}' if status else ''}: {exc}"[:300]
        rec["latency_s"] = round(time.perf_counter() - start, 3)
        return rec


def run(args: argparse.Namespace, transport: Any = None) -> dict[str, Any]:
    facts = make_fact_set(args.seed, args.num_entities)
    questions = facts.questions[:args.num_questions]
    by_id = {q["id"]: q for q in questions}
    doc_text = {d["id"]: d["text"] for d in facts.documents}
    runner = Runner(args, transport)
    models = runner.models()
    roots = [m["id"] for m in models.get("data", []) if not m.get("parent")]
    base_model = args.model or (roots[0] if roots else models["data"][0]["id"])
    index = f"rag-facts-s{args.seed}-n{args.num_entities}"
    index_info = runner.build_index(index, facts)
    configs = configurations(args, base_model)
    started = time.time()
    lock, done, total = threading.Lock(), [0], len(questions) * (len(configs) + 1)

    def task(job: tuple[dict | None, dict]) -> dict:
        config, q = job
        rec = runner.search(index, q, max(args.ks)) if config is None else runner.ask(config, q, index)
        with lock:
            done[0] += 1
            if done[0] % max(1, total // 20) == 0:
                print(f"{done[0]}/{total} requests, {time.time() - started:.0f} s", file=sys.stderr)
        return rec

    # Question-major, so the configurations of one question run close together (shared prefixes).
    jobs = [(c, q) for q in questions for c in [None, *configs]]
    with ThreadPoolExecutor(args.concurrency) as pool:
        outs = list(pool.map(task, jobs))
    searches = [r for (c, _), r in zip(jobs, outs) if c is None]
    records = [score_record(r, by_id[r["question_id"]], doc_text) for (c, _), r in zip(jobs, outs) if c is not None]
    if not args.keep_index:
        runner.http.delete(f"/indexes/{index}")
    results = {}
    for c in configs:
        rows = [r for r in records if r["config"] == c["label"]]
        results[c["label"]] = {"model": c["model"], "rag": c["rag"], **summarise(rows, by_id, c["rag"] is not None)}
    n_par = sum(q["paraphrased"] for q in questions)
    doc = {"tool": "bench.rag_quality",
           "command": "python -m bench.rag_quality " + shlex.join(sys.argv[1:]),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": round(time.time() - started, 1),
           "machine": machine_info(), "server": {"base_url": args.base_url, "models": models},
           "note": "Default model: SmolLM2-135M-Instruct dequantised from GGUF Q4_1. Machine info is the "
                   "client's; the server may run elsewhere.",
           "fact_set": {"generator": "bench.rag_facts.make_fact_set", "seed": args.seed,
                        "num_entities": args.num_entities, "num_questions": len(questions),
                        "paraphrased": n_par, "literal": len(questions) - n_par},
           "index": {"name": index, "index_type": args.index_type, **index_info},
           "request": {"temperature": 0.0, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                       "prompt": "the question alone, as one user message"},
           "metric_definitions": {
               "answer_match": "normalised answer occurs in the normalised reply at word boundaries",
               "exact_match": "normalised reply equals the normalised answer",
               "recall_at_k": "gold doc id among alignment.rag.passages[*].doc_id",
               "cites_any": "replies with at least one entry in alignment.rag.citations",
               "citation_accuracy": "among citing replies, those whose citations include the gold doc",
               "citation_has_answer": "among citing replies, those with a cited passage containing the answer",
               "citation_only_gold": "among citing replies, those citing the gold doc and nothing else",
               "errors": "failed requests; they count as misses"},
           "search_only": search_recall(searches, by_id, args.ks),
           "search_errors": sum(r["error"] is not None for r in searches),
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    write_jsonl(args.out.with_name(args.out.stem + "_records.jsonl"), records)
    plot(doc, args.out.with_suffix(".png"))
    return doc


def plot(doc: dict, path: Path) -> None:
    """Grouped bars per configuration: answer match, recall@k, citation accuracy; Wilson error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(doc["results"])
    metrics = (("answer_match", "answer match"), ("recall_at_k", "recall@k"), ("citation_accuracy", "citation acc."))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 1.5), 3.5))
    for j, (key, name) in enumerate(metrics):
        xs, ys, lo, hi = [], [], [], []
        for i, label in enumerate(labels):
            m = doc["results"][label]["all"].get(key)
            if not m or m["rate"] is None:
                continue
            xs.append(i + (j - 1) * width)
            ys.append(m["rate"])
            # max(0, .): the Wilson bound of a rate of 0 or 1 can sit an ulp inside it.
            lo.append(max(0.0, m["rate"] - m["wilson95"][0]))
            hi.append(max(0.0, m["wilson95"][1] - m["rate"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name)
    ax.axhline(ANSWER_GOAL, ls="--", c="gray", lw=1, label=f"goal {ANSWER_GOAL:.0%} answer match")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of questions (95% Wilson)")
    fs = doc.get("fact_set", {})
    ax.set_title(f"RAG on invented facts: n={fs.get('num_questions')} questions, "
                 f"{fs.get('num_entities')} passages, seed {fs.get('seed')}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dump_questions(args: argparse.Namespace) -> dict[str, Any]:
    """The eval set and the disjoint reader-training set as JSONL (checked disjoint first)."""
    facts = make_fact_set(args.seed, args.num_entities)
    train = make_disjoint_set(args.train_seed, args.train_size)
    assert_disjoint(facts, train)
    out = {"eval": dump(facts, args.dump_questions, f"eval_s{args.seed}"),
           "train": dump(train, args.dump_questions, f"train_s{args.train_seed}")}
    print(json.dumps(out, indent=1))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot is not None:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
    elif args.dump_questions is not None:
        dump_questions(args)
    else:
        doc = run(args)
        for label, r in doc["results"].items():
            a = r["all"]
            extra = (f", recall@k {a['recall_at_k']['rate']:.3f}, citation acc. {a['citation_accuracy']['rate']}"
                     if "recall_at_k" in a else "")
            print(f"{label}: answer match {a['answer_match']['rate']:.3f} (n={a['n']}){extra}")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
