"""Collections on disk: chunking and ids, replace/delete, reopening, crash safety (a writer
killed at random points), and concurrent writers and readers. Vectors are given directly
(seeded random unit vectors) so these tests need no embedding model."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval.chunking import Document, DocumentError, chunk_document, make_document, parse_upload
from retrieval.store import CollectionStore, StoreError

DIM = 16
REPO = Path(__file__).resolve().parents[2]


def vec(key: str) -> np.ndarray:
    rng = np.random.default_rng(abs(hash(key)) % 2**32)
    v = rng.standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def add_docs(collection, docs):
    passages = collection.chunk(docs)
    return collection.add(passages, np.stack([vec(p.id) for p in passages]))


def test_chunks_overlap_and_cover_every_word():
    words = [f"w{i}" for i in range(257)]
    passages = chunk_document(Document("d", "T", " ".join(words)), words=100, overlap=20)
    assert [p.id for p in passages] == ["d#0", "d#1", "d#2"]
    assert all(p.title == "T" and p.doc_id == "d" for p in passages)
    spans = [p.text.split() for p in passages]
    assert spans[0] == words[0:100] and spans[1] == words[80:180] and spans[2] == words[160:257]
    assert len(chunk_document(Document("s", "", "one two"), 100, 20)) == 1


def test_document_validation_and_stable_ids():
    a = make_document({"title": "t", "text": "x y"}, 100)
    assert a.id == make_document({"title": "t", "text": "x y"}, 100).id != make_document({"text": "x y"}, 100).id
    for bad in ({"title": "t"}, {"text": "  "}, {"text": "x", "id": "a#b"}, {"text": "x", "id": "a/b"},
                {"text": "x", "extra": 1}, {"text": "x", "metadata": []}, "text"):
        with pytest.raises(DocumentError) as err:
            make_document(bad, 100)
        assert err.value.status == 400
    with pytest.raises(DocumentError) as err:
        make_document({"text": "x" * 101}, 100)
    assert err.value.status == 413


def test_uploads_by_type():
    (md,) = parse_upload("notes/Guide.md", b"intro\n# The Title\nbody text", 1000)
    assert md.title == "The Title" and md.id == "Guide"
    (txt,) = parse_upload("plain.txt", b"hello there", 1000)
    assert txt.title == "plain"
    docs = parse_upload("d.jsonl", b'{"id": "a", "text": "one"}\n\n{"title": "B", "text": "two"}\n', 1000)
    assert [d.id for d in docs][0] == "a" and docs[1].title == "B"
    with pytest.raises(DocumentError) as err:
        parse_upload("x.pdf", b"%PDF", 1000)
    assert err.value.status == 415
    with pytest.raises(DocumentError, match="line 2"):
        parse_upload("d.jsonl", b'{"text": "ok"}\nnot json\n', 1000)


def test_add_replace_delete_and_reopen(tmp_path):
    store = CollectionStore(tmp_path)
    col = store.create("c1", DIM, "test")
    with pytest.raises(StoreError) as err:
        store.create("c1", DIM, "test")
    assert err.value.status == 409
    add_docs(col, [Document("a", "A", "alpha " * 150), Document("b", "B", "beta")])
    assert (col.num_documents, col.num_passages) == (2, 3)
    result = add_docs(col, [Document("a", "A", "alpha again")])  # replaces a's two passages
    assert result["replaced_passages"] == 2 and (col.num_documents, col.num_passages) == (2, 2)
    hits = col.search(vec("a#0")[None], 2)[0]
    assert hits[0].passage.id == "a#0" and hits[0].passage.text == "alpha again"
    assert abs(hits[0].score - 1.0) < 1e-5
    assert col.delete_document("b") == 1
    with pytest.raises(StoreError) as err:
        col.delete_document("b")
    assert err.value.status == 404
    queries = np.stack([vec(k) for k in ("a#0", "zzz")])
    before = [[(h.passage.id, h.score) for h in q] for q in col.search(queries, 5)]
    store.close()
    again = CollectionStore(tmp_path).get("c1")
    assert [[(h.passage.id, h.score) for h in q] for q in again.search(queries, 5)] == before
    assert sorted(p.name for p in (tmp_path / "c1").iterdir()) == [f"index-{again.generation}.faiss",
                                                                   "passages.sqlite"]


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_other_index_types_follow_deletes(tmp_path, index_type):
    store = CollectionStore(tmp_path)
    col = store.create("c", DIM, "test", index_type=index_type)
    add_docs(col, [Document(f"d{i}", "", f"text {i}") for i in range(60)])
    assert col.index.index_type == index_type
    col.delete_document("d7")
    assert col.index.ntotal == 59
    assert all(h.passage.doc_id != "d7" for h in col.search(vec("d7#0")[None], 59)[0])


@pytest.mark.parametrize("name", ["..", "a/b", "x" * 65, "", ".hidden", "a..b", "-x"])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(StoreError) as err:
        CollectionStore(tmp_path).create(name, DIM, "test")
    assert err.value.status == 400
    assert list(tmp_path.iterdir()) == []


def test_delete_collection(tmp_path):
    store = CollectionStore(tmp_path)
    add_docs(store.create("gone", DIM, "test"), [Document("a", "", "x")])
    store.delete("gone")
    assert store.names() == [] and not (tmp_path / "gone").exists()
    with pytest.raises(StoreError) as err:
        store.get("gone")
    assert err.value.status == 404


WRITER = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from tests.retrieval.test_store import add_docs, Document
from retrieval.store import CollectionStore
col = CollectionStore(sys.argv[1]).get("crash")
tag = sys.argv[3]  # each writer its own ids: it deletes only what it wrote, never an earlier one's
i = 0
while True:
    add_docs(col, [Document(f"{tag}-doc{i}-{j}", "", f"text {i} {j} " * 60) for j in range(5)])
    if i % 3 == 2:
        col.delete_document(f"{tag}-doc{i - 1}-0")
    print(i, flush=True)
    i += 1
"""


def test_a_killed_writer_leaves_a_consistent_collection(tmp_path):
    """SIGKILL a writer at varying points, reopen, and check that SQLite and the index agree
    and the search equals a brute-force search over the committed vectors."""
    CollectionStore(tmp_path).create("crash", DIM, "test")
    rng = np.random.default_rng(0)
    committed = 0
    for round_ in range(6):
        # Earlier writers' passages are never touched again, so none may go missing.
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(REPO), f"w{round_}"],
                                stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        proc.stdout.readline()  # at least one write went through
        time.sleep(float(rng.uniform(0.0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        col = CollectionStore(tmp_path).get("crash")
        assert col.index.ntotal == col.num_passages >= committed
        committed = col.num_passages
        ids, vectors = col._all_vectors()
        query = vec("probe")[None]
        want = ids[np.argsort(-(vectors.astype(np.float64) @ query[0].astype(np.float64)), kind="stable")[:10]]
        got = [h for h in col.search(query, 10)[0]]
        assert len(got) == min(10, len(ids))
        rows = dict(col.db.execute("SELECT pid, rowid FROM passages").fetchall())
        assert [rows[h.passage.id] for h in got][:3] == want[:3].tolist()
        col.close()
    assert committed > 0


def test_concurrent_writers_and_readers_lose_nothing(tmp_path):
    store = CollectionStore(tmp_path)
    col = store.create("busy", DIM, "test")
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            for i in range(15):
                add_docs(col, [Document(f"w{w}-{i}", "", f"writer {w} doc {i}")])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(60):
                for hits in col.search(np.stack([vec("q1"), vec("q2")]), 5):
                    assert all(h.passage.text.startswith("writer") for h in hits)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)] + \
              [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert col.num_passages == col.index.ntotal == 60
    for w in range(4):
        for i in range(15):
            assert col.search(vec(f"w{w}-{i}#0")[None], 1)[0][0].passage.doc_id == f"w{w}-{i}"


OTHER_PROCESS = r"""
import sys
sys.path.insert(0, sys.argv[2])
from tests.retrieval.test_store import add_docs, Document
from retrieval.store import CollectionStore
col = CollectionStore(sys.argv[1]).get("shared")
add_docs(col, [Document(f"far{j}", "", f"far text {j}") for j in range(4)])
col.delete_document("near0")
"""


def test_writes_by_another_process_are_seen(tmp_path):
    """Two processes on one collection (replicas over a shared index root): each search sees
    what the other committed, and a write over a moved generation rebuilds, not patches."""
    store = CollectionStore(tmp_path)
    col = store.create("shared", DIM, "test")
    add_docs(col, [Document(f"near{j}", "", f"near text {j}") for j in range(3)])
    assert col.search(vec("near0#0")[None], 1)[0][0].passage.id == "near0#0"
    done = subprocess.run([sys.executable, "-c", OTHER_PROCESS, str(tmp_path), str(REPO)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = {h.passage.id for h in col.search(vec("far2#0")[None], 10)[0]}
    assert seen == {"near1#0", "near2#0"} | {f"far{j}#0" for j in range(4)}  # near0 deleted there
    ids, vectors = col._all_vectors()  # (vec() differs by process: str hashes are salted)
    rows = dict(col.db.execute("SELECT rowid, pid FROM passages").fetchall())
    nearest = rows[int(ids[np.argmax(vectors.astype(np.float64) @ vec("far2#0").astype(np.float64))])]
    assert col.search(vec("far2#0")[None], 1)[0][0].passage.id == nearest
    other = CollectionStore(tmp_path).get("shared")  # a second reader, then a write here
    add_docs(col, [Document("mine", "", "mine")])
    for reader in (col, other):
        ids, vectors = reader._all_vectors()
        assert reader.search(vec("mine#0")[None], 10)[0][0].passage.id == "mine#0"
        assert {h.passage.id for h in reader.search(vec("x")[None], 10)[0]} == {
            "near1#0", "near2#0", "mine#0"} | {f"far{j}#0" for j in range(4)}
        assert reader.index.ntotal == len(ids) == 7


def test_a_collection_deleted_or_made_anew_by_another_store_is_seen(tmp_path):
    """Two stores over one root (replicas over a shared index root): a collection the other
    deleted is a 404 here at once, and one it made again under the same name is the new one,
    not the copy this store had open."""
    here, there = CollectionStore(tmp_path), CollectionStore(tmp_path)
    add_docs(here.create("shared", DIM, "test"), [Document("old", "", "old text")])
    assert here.get("shared").num_passages == 1
    there.delete("shared")
    with pytest.raises(StoreError) as err:
        here.get("shared")
    assert err.value.status == 404 and "shared" not in here.names()
    add_docs(there.create("shared", DIM, "test"), [Document(f"new{j}", "", f"new text {j}") for j in range(3)])
    again = here.get("shared")
    assert again.num_passages == 3
    assert {h.passage.id for h in again.search(vec("new0#0")[None], 10)[0]} == {"new0#0", "new1#0", "new2#0"}
    assert here.get("shared") is again  # unchanged on disk: the open one is kept
    here.close()
    there.close()
