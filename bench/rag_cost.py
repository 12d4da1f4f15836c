"""`python -m bench.rag_cost`: what retrieval costs.

1. Search latency vs collection size (1k, 10k, 100k passages by default), per index type, at
   the store level (faiss + SQLite, exactly what a request's search runs). The vectors are
   seeded random unit vectors rather than embedded text: a search's cost depends on how many
   vectors there are and the index type, not on what they mean, and embedding 100k passages
   on two cores would take most of an hour. The query embedding (the embedder on one query,
   the other part of a RAG search) is timed separately.
2. With `--base-url`: end-to-end latency and time to first token of the same chat request
   with and without `rag` (interleaved pairs, greedy), against a running server that holds a
   collection built here from the invented fact set.

Writes JSON (with the command and the machine) and a PNG beside it.
"""
from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import machine_info
from bench.plots import replot_if_asked, results_parser

REPO = Path(__file__).resolve().parent.parent
DIM = 384
WORDS = "river town mayor founded company glass pump harbour market bridge tower garden".split()


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1e3
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean())}


def store_search(sizes: list[int], index_types: list[str], queries: int, top_k: int, seed: int) -> list[dict]:
    from retrieval.chunking import Passage
    from retrieval.store import CollectionStore

    rng = np.random.default_rng(seed)
    out = []
    for index_type in index_types:
        with tempfile.TemporaryDirectory() as tmp:
            store = CollectionStore(Path(tmp))
            col = store.create("cost", DIM, "random", index_type=index_type)
            have = 0
            for size in sorted(sizes):
                t0 = time.perf_counter()
                while have < size:
                    n = min(10_000, size - have)
                    passages = [Passage(f"d{have + i}#0", f"d{have + i}", 0, f"Title {have + i}",
                                        " ".join(rng.choice(WORDS, 100)), {}) for i in range(n)]
                    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
                    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                    col.add(passages, vectors)
                    have += n
                insert_s = time.perf_counter() - t0
                q = rng.standard_normal((queries, DIM)).astype(np.float32)
                q /= np.linalg.norm(q, axis=1, keepdims=True)
                col.search(q[:5], top_k)  # warm caches
                samples = []
                for row in q:
                    t = time.perf_counter()
                    col.search(row[None], top_k)
                    samples.append(time.perf_counter() - t)
                out.append({"index_type": index_type, "resolved": col.index.index_type, "passages": size,
                            "top_k": top_k, "insert_s": insert_s, **percentiles(samples)})
                print(json.dumps(out[-1]), flush=True)
            store.close()
    return out


def query_embedding(queries: int) -> dict[str, float]:
    from retrieval.embedder import Embedder

    embedder = Embedder()
    embedder.encode(["warm up"])
    samples = []
    for i in range(queries):
        t = time.perf_counter()
        embedder.encode([f"Who founded the company that makes tidal pumps number {i}?"])
        samples.append(time.perf_counter() - t)
    return percentiles(samples)


def http_overhead(base_url: str, api_key: str, pairs: int, top_k: int) -> dict[str, Any]:
    import httpx

    from bench.rag_facts import make_fact_set

    facts = make_fact_set(0, 300)
    name = "rag-cost-s0"
    with httpx.Client(base_url=base_url.removesuffix("/v1"), headers={"Authorization": f"Bearer {api_key}"},
                      timeout=300) as c:
        c.delete(f"/v1/indexes/{name}")
        c.post("/v1/indexes", json={"name": name}).raise_for_status()
        c.post(f"/v1/indexes/{name}/documents", json={"documents": facts.documents}).raise_for_status()
        runs: dict[str, dict[str, list[float]]] = {"plain": {"e2e": [], "ttft": [], "prompt_tokens": []},
                                                    "rag": {"e2e": [], "ttft": [], "prompt_tokens": []}}
        for i in range(pairs):
            question = facts.questions[i % len(facts.questions)]["question"]
            for label in ("plain", "rag"):
                body = {"messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0,
                        "stream": True, "stream_options": {"include_usage": True}}
                if label == "rag":
                    body["rag"] = {"index": name, "top_k": top_k}
                t0 = time.perf_counter()
                ttft = None
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if ttft is None and any(ch.get("delta", {}).get("content") for ch in chunk["choices"]):
                            ttft = time.perf_counter() - t0
                        if chunk.get("usage"):
                            runs[label]["prompt_tokens"].append(chunk["usage"]["prompt_tokens"])
                runs[label]["e2e"].append(time.perf_counter() - t0)
                runs[label]["ttft"].append(ttft if ttft is not None else runs[label]["e2e"][-1])
        c.delete(f"/v1/indexes/{name}")
    return {label: {"e2e": percentiles(r["e2e"]), "ttft": percentiles(r["ttft"]),
                    "mean_prompt_tokens": float(np.mean(r["prompt_tokens"]))} for label, r in runs.items()}


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if doc.get("http") else 1, figsize=(10 if doc.get("http") else 5, 3.6))
    axes = np.atleast_1d(axes)
    for index_type in sorted({r["index_type"] for r in doc["search"]}):
        rows = [r for r in doc["search"] if r["index_type"] == index_type]
        axes[0].plot([r["passages"] for r in rows], [r["p50_ms"] for r in rows], marker="o", label=f"{index_type} p50")
    axes[0].axhline(doc["query_embedding"]["p50_ms"], ls="--", c="gray", lw=1, label="query embedding p50")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("passages in the collection")
    axes[0].set_ylabel("ms per search (top-k, one query)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("search latency vs collection size", fontsize=9)
    if doc.get("http"):
        h = doc["http"]
        labels = ["TTFT plain", "TTFT rag", "e2e plain", "e2e rag"]
        values = [h["plain"]["ttft"]["p50_ms"], h["rag"]["ttft"]["p50_ms"], h["plain"]["e2e"]["p50_ms"],
                  h["rag"]["e2e"]["p50_ms"]]
        axes[1].bar(labels, values, color=["C0", "C1", "C0", "C1"])
        axes[1].set_ylabel("ms (p50)")
        axes[1].set_title(f"one chat request, 16 tokens, with and without rag (n={h['rag']['e2e']['n']})",
                          fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = results_parser(__doc__.splitlines()[0], REPO / "bench" / "results" / "rag_cost.json")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--index-types", default="flat,hnsw")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-url", help="Also time chat requests with and without rag on this server.")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--pairs", type=int, default=30)
    args = parser.parse_args(argv)
    if replot_if_asked(args, plot):
        return
    doc: dict[str, Any] = {"command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "bench.rag_cost",
                                                                        *(argv if argv is not None else sys.argv[1:])]),
                           "machine": machine_info(), "seed": args.seed}
    doc["search"] = store_search([int(s) for s in args.sizes.split(",")], args.index_types.split(","),
                                 args.queries, args.top_k, args.seed)
    doc["query_embedding"] = query_embedding(args.queries)
    if args.base_url:
        doc["http"] = http_overhead(args.base_url, args.api_key, args.pairs, args.top_k)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1))
    plot(doc, args.output.with_suffix(".png"))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
