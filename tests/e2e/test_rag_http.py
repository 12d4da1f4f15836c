"""Collections, embeddings and `rag` over HTTP against `alignserve serve` in a subprocess:
the real `openai` client, every documented 4xx, a restart, and 8 concurrent clients."""
from __future__ import annotations

import base64
import json
import threading

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.e2e
KEY = "rag-key"
FACTS = [
    {"id": "kellin", "title": "Zorvath Kellin",
     "text": "Zorvath Kellin was born in Miruna in 1971 and works for Talvex Systems as a glassblower."},
    {"id": "miruna", "title": "Miruna", "text": "Miruna is a small town on the river Osk. Its mayor is Bela Trun."},
    {"id": "talvex", "title": "Talvex Systems",
     "text": "Talvex Systems was founded by Ilsa Quorren in 1988 and makes tidal pumps in Vendrel."},
]


@pytest.fixture(scope="module")
def adapter_path(model_dir, tmp_path_factory):
    from tests.adapters.real_lora import ATTENTION, make_real_adapter

    return make_real_adapter(model_dir, tmp_path_factory.mktemp("rag-adapter") / "reader", ATTENTION,
                             rank=8, seed=5, std=0.05)


@pytest.fixture(scope="module")
def index_root(tmp_path_factory):
    return tmp_path_factory.mktemp("rag-indexes")


@pytest.fixture(scope="module")
def srv(model_dir, index_root, adapter_path):
    s = ServerProcess("--num-kv-blocks", "1024", "--max-model-len", "1024", "--index-root", str(index_root),
                      "--lora-modules", f"reader={adapter_path}", api_key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def facts(http):
    assert http.post("/v1/indexes", json={"name": "facts"}).status_code == 200
    r = http.post("/v1/indexes/facts/documents", json={"documents": FACTS})
    assert r.status_code == 200 and r.json()["added_passages"] == 3, r.text
    return "facts"


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert set(body) >= {"message", "type", "param", "code"} and body["message"]
    return body


def test_collection_lifecycle(http):
    info = http.post("/v1/indexes", json={"name": "life", "index_type": "flat"}).json()
    assert info["name"] == "life" and info["kind"] == "collection" and info["dim"] == 384
    error(http.post("/v1/indexes", json={"name": "life"}), 409)
    assert "life" in [i["name"] for i in http.get("/v1/indexes").json()["data"]]
    # A bare JSON list, and a multipart upload of the three accepted types.
    assert http.post("/v1/indexes/life/documents", json=[{"title": "A", "text": "alpha " * 230}]).json()[
        "added_passages"] == 3
    files = [("files", ("guide.md", b"# Guide\nThe lighthouse keeper is Oren.", "text/markdown")),
             ("files", ("plain.txt", b"Plain text about gardens.", "text/plain")),
             ("files", ("more.jsonl", b'{"id": "j1", "text": "jsonl one"}\n{"id": "j2", "text": "two"}\n',
                        "application/jsonl"))]
    r = http.post("/v1/indexes/life/documents", files=files)
    assert r.status_code == 200 and r.json()["ids"] == ["guide", "plain", "j1", "j2"], r.text
    error(http.post("/v1/indexes/life/documents", files=[("files", ("x.pdf", b"%PDF-1.4", "application/pdf"))]), 415)
    hits = http.post("/v1/indexes/life/search", json={"query": "who keeps the lighthouse?", "top_k": 2}).json()["data"]
    assert hits[0]["id"] == "guide#0" and hits[0]["title"] == "Guide" and hits[0]["score"] > hits[1]["score"]
    assert http.get("/v1/indexes/life").json()["num_documents"] == 5
    assert http.delete("/v1/indexes/life/documents/guide").json()["removed_passages"] == 1
    error(http.delete("/v1/indexes/life/documents/guide"), 404)
    hits = http.post("/v1/indexes/life/search", json={"query": "who keeps the lighthouse?", "top_k": 10}).json()["data"]
    assert "guide" not in {h["doc_id"] for h in hits} and len(hits) == 6
    assert http.delete("/v1/indexes/life").json()["deleted"] is True
    error(http.get("/v1/indexes/life"), 404)


@pytest.mark.parametrize("name", ["..", "a/b", "x" * 300, "", "../etc"])
def test_bad_names(http, name):
    error(http.post("/v1/indexes", json={"name": name}), 400)


def test_bad_input_is_refused_and_the_server_keeps_serving(http, facts):
    for method, path in [("get", "/v1/indexes/nope"), ("delete", "/v1/indexes/nope")]:
        error(http.request(method, path), 404)
    error(http.post("/v1/indexes/nope/search", json={"query": "x"}), 404)
    error(http.post("/v1/indexes/nope/documents", json=[{"text": "x"}]), 404)
    error(http.post("/v1/indexes/facts/documents", json=[{"title": "t", "text": ""}]), 400)
    error(http.post("/v1/indexes/facts/documents", json=[]), 400)
    error(http.post("/v1/indexes/facts/documents", json=[{"text": "x" * 1_000_001}]), 413)
    error(http.post("/v1/indexes/facts/documents", content=b"x", headers={"content-type": "text/csv"}), 415)
    for top_k in (0, 10_000):
        error(http.post("/v1/indexes/facts/search", json={"query": "x", "top_k": top_k}), 400)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "rag": {"index": "facts", "top_k": top_k}}
        error(http.post("/v1/chat/completions", json=body), 400)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "rag": {"index": "nope"}}
    assert error(http.post("/v1/chat/completions", json=body), 404)["param"] == "rag.index"
    body = {"prompt": [1, 2, 3], "max_tokens": 2, "rag": {"index": "facts"}}
    error(http.post("/v1/completions", json=body), 400)
    error(http.post("/v1/embeddings", json={"input": ""}), 400)
    error(http.post("/v1/embeddings", json={"input": [[1, 2]]}), 400)
    error(http.post("/v1/embeddings", json={"input": "x", "model": "text-embedding-3-small"}), 404)
    assert http.get("/health").json() == {"status": "ok"}
    assert http.post("/v1/indexes/facts/search", json={"query": "Osk", "top_k": 1}).status_code == 200


def test_rag_on_an_empty_collection_reports_no_passages(http):
    http.post("/v1/indexes", json={"name": "empty"})
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}
    plain = http.post("/v1/chat/completions", json=body).json()
    r = http.post("/v1/chat/completions", json={**body, "rag": {"index": "empty"}}).json()
    assert r["alignment"]["rag"]["passages"] == [] and r["alignment"]["rag"]["citations"] == []
    assert r["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]  # prompt left as it was


def test_embeddings_with_the_openai_client(client):
    from retrieval.embedder import Embedder

    texts = ["The river Osk floods in spring.", "Tidal pumps"]
    want = Embedder().encode(texts)
    # Unless told a format, the client asks for base64 and decodes it itself; an explicit
    # "base64" comes back as the string.
    for fmt in ("float", "base64", None):
        kwargs = {"encoding_format": fmt} if fmt else {}
        r = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, **kwargs)
        rows = [np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64" else d.embedding
                for d in r.data]
        got = np.array(rows, dtype=np.float64)
        assert got.shape == (2, 384) and [d.index for d in r.data] == [0, 1]
        # Same model, same inputs, one batch: only float32 summation order may differ.
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert r.usage.prompt_tokens == r.usage.total_tokens > 4


def test_rag_chat_with_the_openai_client(client, http, facts):
    question = [{"role": "user", "content": "Who is the mayor of Miruna?"}]
    rag = {"index": facts, "top_k": 2}
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, max_tokens=24,
                                       temperature=0, extra_body={"rag": rag})
    report = r.model_extra["alignment"]["rag"]
    search = http.post(f"/v1/indexes/{facts}/search", json={"query": question[0]["content"], "top_k": 2}).json()
    assert [p["id"] for p in report["passages"]] == [h["id"] for h in search["data"]]
    assert report["passages"][0]["doc_id"] == "miruna"
    assert r.choices[0].message.content  # what the answers are worth: bench/rag_quality.py
    for c in report["citations"]:
        assert c["id"] == report["passages"][c["marker"] - 1]["id"]
    chunks = list(client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, max_tokens=24,
                                                 temperature=0, stream=True, extra_body={"rag": rag}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    last = [c for c in chunks if c.model_extra.get("alignment")]
    assert len(last) == 1 and last[0].model_extra["alignment"]["rag"] == report
    assert last[0].choices[0].finish_reason is not None  # on the last chunk


def test_extractive_answers_are_spans_of_the_passages(http, facts):
    body = {"messages": [{"role": "user", "content": "When was Zorvath Kellin born?"}], "max_tokens": 24,
            "temperature": 0, "rag": {"index": facts, "top_k": 2, "mode": "extractive"}}
    r = http.post("/v1/chat/completions", json=body).json()
    answer = r["choices"][0]["message"]["content"].strip()
    texts = {f["id"]: f["text"] for f in FACTS}
    report = r["alignment"]["rag"]
    assert answer and any(answer in texts[p["doc_id"]] for p in report["passages"]), answer
    assert {c["doc_id"] for c in report["citations"]} == {p["doc_id"] for p in report["passages"]
                                                          if answer in texts[p["doc_id"]]}


def test_rag_composes_with_adapter_dola_genarm_and_best_of(http, facts):
    base = {"messages": [{"role": "user", "content": "Where does Talvex Systems make pumps?"}], "max_tokens": 12,
            "temperature": 0, "rag": {"index": facts, "top_k": 2}}
    for extra, key in [({"model": "reader"}, None), ({"dola_layers": "high"}, "dola"),
                       ({"genarm": {"reward_model": "reader", "alpha": 0.5}}, "genarm"),
                       ({"best_of": 2, "temperature": 0.8, "seed": 1}, "best_of")]:
        r = http.post("/v1/chat/completions", json={**base, **extra})
        assert r.status_code == 200, (extra, r.text)
        alignment = r.json()["alignment"]
        assert alignment["rag"]["passages"][0]["doc_id"] == "talvex", extra
        if key is not None:
            assert key in alignment or any(key in k for k in alignment), (key, alignment.keys())
    r = http.post("/v1/completions", json={"prompt": "Talvex Systems makes", "max_tokens": 6, "temperature": 0,
                                           "rag": {"index": facts, "top_k": 1}}).json()
    assert r["alignment"]["rag"]["passages"][0]["doc_id"] == "talvex"


def test_eight_concurrent_clients_lose_nothing(srv, http):
    http.post("/v1/indexes", json={"name": "busy"})
    failures: list[str] = []

    def work(w: int) -> None:
        with httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            for i in range(4):
                r = c.post("/v1/indexes/busy/documents",
                           json=[{"id": f"w{w}d{i}", "text": f"Worker {w} wrote note {i} about comet {w * 10 + i}."}])
                if r.status_code != 200:
                    failures.append(r.text)
                r = c.post("/v1/indexes/busy/search", json={"query": f"comet {w * 10 + i}", "top_k": 3})
                if r.status_code != 200:
                    failures.append(r.text)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    info = http.get("/v1/indexes/busy").json()
    assert info["num_documents"] == info["num_passages"] == 32
    hits = http.post("/v1/indexes/busy/search", json={"query": "comet", "top_k": 100}).json()["data"]
    assert sorted(h["doc_id"] for h in hits) == sorted(f"w{w}d{i}" for w in range(8) for i in range(4))


def test_collections_survive_a_restart(model_dir, tmp_path):
    queries = ["mayor of Miruna", "tidal pumps", "glassblower born 1971"]

    def results(s: ServerProcess) -> list:
        with httpx.Client(base_url=s.base_url, timeout=120) as c:
            return [c.post("/v1/indexes/keep/search", json={"query": q, "top_k": 3}).json()["data"] for q in queries]

    first = ServerProcess("--num-kv-blocks", "64", "--max-model-len", "256", "--index-root", str(tmp_path))
    try:
        with httpx.Client(base_url=first.base_url, timeout=120) as c:
            c.post("/v1/indexes", json={"name": "keep", "index_type": "hnsw"})
            c.post("/v1/indexes/keep/documents", json=FACTS)
        before = results(first)
    finally:
        first.stop()
    second = ServerProcess("--num-kv-blocks", "64", "--max-model-len", "256", "--index-root", str(tmp_path))
    try:
        assert results(second) == before
        with httpx.Client(base_url=second.base_url, timeout=120) as c:
            assert [i["name"] for i in c.get("/v1/indexes").json()["data"]] == ["keep"]
    finally:
        second.stop()
    assert json.dumps(before)  # plain JSON round trip


def test_quality_bench_runs_against_the_server(srv, tmp_path):
    """bench.rag_quality end to end on a few questions: its bookkeeping over real replies."""
    from bench.rag_quality import parse_args, run

    out = tmp_path / "rag.json"
    doc = run(parse_args(["--base-url", srv.base_url + "/v1", "--api-key", KEY, "--num-entities", "12",
                          "--num-questions", "6", "--ks", "1", "--reader-adapter", "reader", "--out", str(out),
                          "--concurrency", "2", "--max-tokens", "8"]))
    assert list(doc["results"]) == ["closed_book", "reader_closed_book", "generate_k1", "extractive_k1",
                                    "reader_generate_k1"]
    assert all(r["all"]["n"] == 6 for r in doc["results"].values())
    k1 = doc["results"]["generate_k1"]["all"]
    # The chat's retrieval and the search route's are one code path: equal recall.
    assert k1["recall_at_k"]["k"] == doc["search_only"]["k1"]["all"]["recall_at_k"]["k"]
    assert doc["results"]["closed_book"]["all"]["answer_match"]["k"] == 0  # invented facts
    assert out.with_suffix(".png").stat().st_size > 0
