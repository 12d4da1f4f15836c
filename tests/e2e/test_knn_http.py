"""kNN-LM over HTTP: a datastore built offline by `alignserve index knn-build`, served, used
through the real `openai` client, composed with RAG, refused under another adapter, listed
and removed beside RAG collections; bad options are 400s naming the field."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ServerProcess
from tests.e2e.probes import requests_counted, wait_until_idle

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
CORPUS = ("The river Velmor flows through Tarsk and Quill. Tarsk is known for blue glass and Quill for stone "
          "bridges. The mayor of Tarsk is Oren Vale, who founded the glass guild in 1871.\n")
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two unrelated LoRA adapters: `mine` (A) gets a datastore of its own, `other` (B) does not."""
    from tests.adapters.real_lora import ATTENTION, make_real_adapter

    base = tmp_path_factory.mktemp("knn-adapters")
    return {name: make_real_adapter(model_dir, base / name, ATTENTION, rank=4, seed=seed, std=0.05)
            for name, seed in (("mine", 5), ("other", 3))}


def knn_build(root: Path, corpus: Path, name: str, *extra: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "server.cli", "index", "knn-build", "--corpus", str(corpus),
                           "--name", name, "--index-root", str(root), "--context-window", "64",
                           "--dtype", "float32", *extra], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def root(tmp_path_factory, model_dir, adapters):
    root = tmp_path_factory.mktemp("knn-root")
    corpus = root.parent / "velmor.txt"
    corpus.write_text(CORPUS * 3)
    info = knn_build(root, corpus, "velmor")
    assert info["kind"] == "knn_datastore" and info["num_keys"] > 50
    # The same text under adapter A: its keys are A's hidden states, not the base model's.
    info = knn_build(root, corpus, "velmor-a", "--adapter", str(adapters["mine"]), "--adapter-name", "mine")
    assert info["kind"] == "knn_datastore" and info["num_keys"] > 50
    return root


@pytest.fixture(scope="module")
def srv(root, adapters):
    s = ServerProcess("--num-kv-blocks", "512", "--max-model-len", "512", "--index-root", str(root),
                      *(a for name, path in adapters.items() for a in ("--lora-modules", f"{name}={path}")))
    yield s
    s.stop()


def chat(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Who is the mayor of Tarsk?"}],
            "max_tokens": 12, "temperature": 0, **extra}


def test_knn_lm_with_the_openai_client(srv):
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    knn = {"datastore": "velmor", "k": 16, "lambda": 0.5}
    body = chat()
    r = client.chat.completions.create(**body, extra_body={"knn_lm": knn})
    report = r.model_extra["alignment"]["knn_lm"]
    assert report["datastore"] == "velmor" and report["k"] == 16 and report["tokens"] == r.usage.completion_tokens
    assert 0 < report["mean_knn_weight"] <= 1
    chunks = list(client.chat.completions.create(**body, stream=True, extra_body={"knn_lm": knn}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    # (The second request reads the prompt's KV from the prefix cache: floats may differ in the last bits.)
    streamed = [c.model_extra["alignment"]["knn_lm"] for c in chunks if c.model_extra.get("alignment")]
    assert len(streamed) == 1 and streamed[0].keys() == report.keys()
    for key, value in report.items():
        assert streamed[0][key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key


def test_knn_lm_composes_with_a_json_schema(srv):
    """The grammar masks the mixture's scores: the reply parses and validates."""
    import jsonschema

    schema = {"type": "object", "required": ["mayor"], "properties": {"mayor": {"type": "string", "maxLength": 20}}}
    body = chat(max_tokens=24, knn_lm={"datastore": "velmor", "k": 16, "lambda": 0.5},
                response_format={"type": "json_schema", "json_schema": {"name": "m", "schema": schema}})
    r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)
    assert r.json()["alignment"]["knn_lm"]["tokens"] == r.json()["usage"]["completion_tokens"]


def test_prompt_logprobs_echo_and_perplexity(srv):
    """OpenAI's echo + logprobs with max_tokens 0, vLLM's prompt_logprobs, with and without
    kNN-LM: the store holds this text, so its tokens get likelier."""
    text = CORPUS.strip()
    with httpx.Client(base_url=srv.base_url, timeout=120) as c:
        def score(**extra) -> dict:
            r = c.post("/v1/completions", json={"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1,
                                                "temperature": 0, **extra})
            assert r.status_code == 200, r.text
            return r.json()

        plain, knn = score(), score(knn_lm={"datastore": "velmor", "k": 16, "lambda": 0.5})
        for r in (plain, knn):
            choice = r["choices"][0]
            assert choice["text"] == text and r["usage"]["completion_tokens"] == 0
            lps = choice["logprobs"]["token_logprobs"]
            assert len(lps) == r["usage"]["prompt_tokens"] and lps[0] is None
            assert "".join(choice["logprobs"]["tokens"]) == text
        mean = {k: sum(v["choices"][0]["logprobs"]["token_logprobs"][1:]) for k, v in (("plain", plain), ("knn", knn))}
        assert mean["knn"] > mean["plain"]  # sanity: the datastore holds this very text
        v = c.post("/v1/completions", json={"prompt": text, "max_tokens": 1, "prompt_logprobs": 2,
                                            "temperature": 0}).json()["choices"][0]["prompt_logprobs"]
        assert v[0] is None and len(v) == plain["usage"]["prompt_tokens"]
        for entry, lp in zip(v[1:], plain["choices"][0]["logprobs"]["token_logprobs"][1:]):
            actual = min(entry.values(), key=lambda e: e["logprob"] if e["rank"] is None else -e["logprob"])
            assert any(abs(e["logprob"] - lp) < 1e-6 for e in entry.values()) and actual["rank"] >= 1
        for bad in ({"stream": True, "echo": True, "max_tokens": 1}, {"stream": True, "prompt_logprobs": 1}):
            r = c.post("/v1/completions", json={"prompt": text, **bad})
            assert r.status_code == 400


def test_perplexity_bench_against_the_server(srv, tmp_path):
    """bench.knn_quality over real prompt logprobs: the store holds the sanity documents."""
    from bench.knn_quality import main

    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "d0", "title": "Velmor", "text": CORPUS.strip()}) + "\n")
    out = tmp_path / "knn.json"
    main(["--base-url", srv.base_url + "/v1", "--datastore", "velmor", "--eval-file", str(docs), "--train-file",
          str(docs), "--lambdas", "0.5", "--ks", "16", "--temperatures", "1", "--sanity-docs", "1",
          "--out", str(out), "--resamples", "50"])
    doc = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    text = json.dumps(doc)
    assert "ppl" in text and "relative" in text  # base, sweep and sanity rows are reported


def test_a_store_built_under_an_adapter_serves_that_adapter_only(srv):
    """Keys are hidden states of (model, adapter): A's store works under A, and under the base
    model or adapter B its keys would describe another network, so those get 409."""
    with httpx.Client(base_url=srv.base_url, timeout=120) as c:
        listed = {i["name"]: i for i in c.get("/v1/indexes").json()["data"]}
        assert listed["velmor-a"]["kind"] == "knn_datastore"
        knn = {"datastore": "velmor-a", "k": 16, "lambda": 0.5}
        for model in (MODEL, "other"):
            r = c.post("/v1/chat/completions", json=chat(model=model, knn_lm=knn))
            assert r.status_code == 409 and r.json()["error"]["param"] == "knn_lm.datastore", (model, r.text)
        r = c.post("/v1/chat/completions", json=chat(model="mine", knn_lm=knn))
        assert r.status_code == 200, r.text
        report = r.json()["alignment"]["knn_lm"]
        assert report["datastore"] == "velmor-a" and 0 < report["mean_knn_weight"] <= 1
        # Its own text is in A's store: under A, kNN-LM must make that text likelier.
        def total_logprob(**extra) -> float:
            r = c.post("/v1/completions", json={"model": "mine", "prompt": CORPUS.strip(), "max_tokens": 0,
                                                "echo": True, "logprobs": 0, "temperature": 0, **extra})
            assert r.status_code == 200, r.text
            return sum(r.json()["choices"][0]["logprobs"]["token_logprobs"][1:])
        assert total_logprob(knn_lm=knn) > total_logprob()


def test_cut_knn_lm_streams_free_everything(srv):
    """Streams under kNN-LM cut after their first chunk: every KV block is freed, no request
    runs to its end, and the server keeps serving kNN-LM requests."""
    ok_before = requests_counted(srv, "chat", "ok")

    async def cut(client: httpx.AsyncClient, i: int) -> int:
        body = chat(stream=True, max_tokens=400, ignore_eos=True, knn_lm={"datastore": "velmor", "k": 16})
        body["messages"][0]["content"] = f"Tell story {i} about Tarsk, at length."
        async with client.stream("POST", srv.base_url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    return 1  # leaving the context closes the connection mid-stream
        return 0

    async def main() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(cut(client, i) for i in range(8)))

    assert asyncio.run(main()) == [1] * 8
    wait_until_idle(srv)
    assert requests_counted(srv, "chat", "ok") == ok_before, "a cut stream ran to its end"
    r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=120,
                   json=chat(max_tokens=3, ignore_eos=True, knn_lm={"datastore": "velmor"}))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_listed_composed_refused_and_removed(srv):
    # NOTE: last in the file, since it removes `velmor`.
    with httpx.Client(base_url=srv.base_url, timeout=120) as c:
        kinds = {i["name"]: i["kind"] for i in c.get("/v1/indexes").json()["data"]}
        assert kinds["velmor"] == "knn_datastore"
        c.post("/v1/indexes", json={"name": "docs"})
        c.post("/v1/indexes/docs/documents", json=[{"title": "Tarsk", "text": "The mayor of Tarsk is Oren Vale."}])
        both = c.post("/v1/chat/completions", json=chat(knn_lm={"datastore": "velmor"}, rag={"index": "docs"}))
        assert both.status_code == 200 and {"knn_lm", "rag"} <= set(both.json()["alignment"])
        wrong = c.post("/v1/chat/completions", json=chat(model="other", knn_lm={"datastore": "velmor"}))
        assert wrong.status_code == 409 and wrong.json()["error"]["param"] == "knn_lm.datastore"
        composed = c.post("/v1/chat/completions", json=chat(model="mine", knn_lm={"datastore": "velmor-a"},
                                                            rag={"index": "docs"}))
        assert composed.status_code == 200 and {"knn_lm", "rag"} <= set(composed.json()["alignment"])
        assert c.post("/v1/chat/completions", json=chat(knn_lm={"datastore": "nope"})).status_code == 404
        for bad, field in (({"k": 0}, "k"), ({"lambda": 1.5}, "lambda"), ({"temperature": 0}, "temperature")):
            r = c.post("/v1/chat/completions", json=chat(knn_lm={"datastore": "velmor", **bad}))
            assert r.status_code == 400 and field in r.json()["error"]["param"], r.text
        r = c.post("/v1/chat/completions", json=chat(knn_lm={"datastore": "velmor"}, dola_layers="high"))
        assert r.status_code == 400 and r.json()["error"]["param"] == "knn_lm"
        assert c.delete("/v1/indexes/velmor").json()["deleted"] is True
        assert "velmor" not in {i["name"] for i in c.get("/v1/indexes").json()["data"]}
        assert c.post("/v1/chat/completions", json=chat(knn_lm={"datastore": "velmor"})).status_code == 404
        assert c.get("/health").status_code == 200
