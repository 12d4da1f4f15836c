"""RAG collections on disk: passages, titles, metadata and vectors in SQLite, the faiss
index in a file beside it, one directory per collection under the index root.

SQLite is the truth; the faiss file is derived. Every write is one SQLite transaction that
also bumps the collection's generation; the index is then saved as `index-<gen>.faiss`
(written to a temporary file and renamed). A crash before the commit leaves the previous
generation and its index file; a crash after it leaves an index file of an older generation,
and opening the collection rebuilds the index from the vectors in SQLite. So a reader never
sees passages without vectors or the reverse, and a restarted server reopens every
collection as it was last committed.

A collection serialises its writes and searches with one lock (searches take well under a
millisecond below 100k passages; embedding, the slow part, happens before the lock).
Several processes may open one collection (Ray Serve replicas over a shared index root): a
search first compares SQLite's generation with its own (one indexed read) and reopens the index
when another process has written, and a write that finds the generation moved under its
transaction rebuilds the index from SQLite instead of patching a stale one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.chunking import CHUNK_OVERLAP, CHUNK_WORDS, Document, Passage, chunk_document
from retrieval.index import IVF_MIN_TRAIN, VectorIndex, resolve_type

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS passages (
    rowid INTEGER PRIMARY KEY,            -- the faiss id
    pid TEXT NOT NULL UNIQUE,             -- doc_id#chunk
    doc_id TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS passages_doc ON passages (doc_id);
"""


class StoreError(Exception):
    """A collection operation the caller got wrong; `status` is its HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise StoreError("index names are 1-64 characters: letters, digits, '_', '-', '.', starting with a "
                         "letter or digit, without '..'", 400, "name")
    return name


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float

    def to_dict(self, with_text: bool = True) -> dict[str, Any]:
        p = self.passage
        out = {"id": p.id, "doc_id": p.doc_id, "title": p.title, "score": self.score, "metadata": p.metadata}
        if with_text:
            out["text"] = p.text
        return out


def file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a file, None when there is none. A collection (its passages.sqlite) or
    datastore (its datastore.json) deleted and made again under its name by another process (a
    replica over the same index root) has a new file, so an open handle can tell it is stale."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class Collection:
    """One collection: its SQLite database and faiss index."""

    def __init__(self, path: Path, dim: int | None = None, index_type: str = "auto",
                 chunk_words: int = CHUNK_WORDS, chunk_overlap: int = CHUNK_OVERLAP,
                 embedder_name: str = "", create: bool = False, use_gpu: bool = False) -> None:
        self.path = path
        self.name = path.name
        self.lock = threading.RLock()
        self.db = sqlite3.connect(path / "passages.sqlite", check_same_thread=False, isolation_level=None)
        self.file_id = file_id(path / "passages.sqlite")  # which database file this is (another process may replace it)
        self.db.executescript(SCHEMA)
        if create:
            self._write_meta({"dim": dim, "index_type": index_type, "chunk_words": chunk_words,
                              "chunk_overlap": chunk_overlap, "embedder": embedder_name, "generation": 0,
                              "created_at": int(time.time())})
        self._reload_meta()
        self.dim = int(self.meta["dim"])
        self._stale = False  # the in-memory index predates a write by another process
        self.index = self._open_index(use_gpu)

    # ---- metadata ----------------------------------------------------------------------
    def _reload_meta(self) -> None:
        self.meta = {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    def _write_meta(self, values: dict[str, Any]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                            [(k, json.dumps(v)) for k, v in values.items()])

    @property
    def generation(self) -> int:
        return int(self.meta["generation"])

    def _committed_generation(self, cur: sqlite3.Cursor | None = None) -> int:
        row = (cur or self.db).execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(json.loads(row[0]))

    def _sync(self) -> None:
        """Catch up with a write another process committed (caller holds the lock)."""
        if self._stale or self._committed_generation() != self.generation:
            self._reload_meta()
            self.index = self._open_index(self.index.use_gpu)
            self._stale = False

    @property
    def num_passages(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM passages").fetchone()[0]

    @property
    def num_documents(self) -> int:
        return self.db.execute("SELECT COUNT(DISTINCT doc_id) FROM passages").fetchone()[0]

    def info(self) -> dict[str, Any]:
        with self.lock:
            return {"object": "index", "name": self.name, "kind": "collection",
                    "index_type": self.index.index_type, "requested_index_type": self.meta["index_type"],
                    "num_documents": self.num_documents, "num_passages": self.num_passages, "dim": self.dim,
                    "embedder": self.meta["embedder"], "chunk_words": self.meta["chunk_words"],
                    "chunk_overlap": self.meta["chunk_overlap"], "created_at": self.meta["created_at"]}

    # ---- the index ---------------------------------------------------------------------
    def _index_file(self, generation: int) -> Path:
        return self.path / f"index-{generation}.faiss"

    def _all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self.db.execute("SELECT rowid, vector FROM passages ORDER BY rowid").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vectors = (np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(-1, self.dim)
                   if rows else np.zeros((0, self.dim), np.float32))
        return ids, vectors

    def _open_index(self, use_gpu: bool) -> VectorIndex:
        kind = resolve_type(self.meta["index_type"], self.num_passages)
        path = self._index_file(self.generation)
        if path.exists():
            index = VectorIndex.load(path, self.dim, kind, use_gpu=use_gpu)
            if index.ntotal == self.num_passages:
                return index
        # The index file is missing or behind SQLite (a crash between the commit and the
        # save): rebuild from the committed vectors.
        index = VectorIndex(self.dim, kind, use_gpu=use_gpu)
        index.rebuild(*self._all_vectors())
        self._save_index(index)
        return index

    def _save_index(self, index: VectorIndex) -> None:
        index.save(self._index_file(self.generation))
        for old in self.path.glob("index-*.faiss"):
            if old.name != self._index_file(self.generation).name:
                old.unlink(missing_ok=True)

    def _refresh_index(self, removed: np.ndarray, added_ids: np.ndarray, added: np.ndarray) -> None:
        """Bring the in-memory index up to the committed state, then save it."""
        kind = resolve_type(self.meta["index_type"], self.num_passages)
        grew_past_training = (kind == "ivf" and not self.index.is_trained_ivf
                              and self.num_passages >= IVF_MIN_TRAIN)
        if (self._stale or kind != self.index.index_type or grew_past_training
                or (len(removed) and not self.index.can_remove())):
            index = VectorIndex(self.dim, kind, use_gpu=self.index.use_gpu)
            index.rebuild(*self._all_vectors())
            self.index = index
            self._stale = False
        else:
            if len(removed):
                self.index.remove(removed)
            if len(added_ids):
                self.index.add(added_ids, added)
        self._save_index(self.index)

    # ---- writes ------------------------------------------------------------------------
    def chunk(self, docs: list[Document]) -> list[Passage]:
        return [p for d in docs for p in chunk_document(d, self.meta["chunk_words"], self.meta["chunk_overlap"])]

    def add(self, passages: list[Passage], vectors: np.ndarray) -> dict[str, Any]:
        """Insert passages (vectors aligned with them); a document already present is replaced
        whole. One transaction; returns counts and the document ids."""
        if len(passages) != len(vectors):
            raise ValueError("one vector per passage")
        if len({p.id for p in passages}) != len(passages):
            raise ValueError("passage ids repeat: give each document once")
        doc_ids = list(dict.fromkeys(p.doc_id for p in passages))
        with self.lock:
            with self._transaction() as cur:
                removed = self._delete_docs(cur, doc_ids)
                start = (cur.execute("SELECT COALESCE(MAX(rowid), 0) FROM passages").fetchone()[0]) + 1
                ids = np.arange(start, start + len(passages), dtype=np.int64)
                cur.executemany(
                    "INSERT INTO passages (rowid, pid, doc_id, chunk, title, text, metadata, vector) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(int(i), p.id, p.doc_id, p.chunk, p.title, p.text, json.dumps(p.metadata),
                      np.ascontiguousarray(v, dtype=np.float32).tobytes())
                     for i, p, v in zip(ids, passages, vectors)])
            self._refresh_index(removed, ids, vectors)
        return {"added_documents": len(doc_ids), "added_passages": len(passages), "ids": doc_ids,
                "replaced_passages": int(len(removed))}

    def _delete_docs(self, cur: sqlite3.Cursor, doc_ids: list[str]) -> np.ndarray:
        removed: list[int] = []
        for doc_id in doc_ids:
            removed += [r[0] for r in cur.execute("SELECT rowid FROM passages WHERE doc_id = ?", (doc_id,))]
            cur.execute("DELETE FROM passages WHERE doc_id = ?", (doc_id,))
        return np.array(removed, dtype=np.int64)

    @contextmanager
    def _transaction(self):
        """One write: the caller's statements and the generation bump commit together, or
        nothing does (and the in-memory metadata goes back to what SQLite holds)."""
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            if self._committed_generation(cur) != self.generation:  # another process wrote
                self._reload_meta()
                self._stale = True
            yield cur
            self._bump(cur)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            self._reload_meta()
            raise

    def _bump(self, cur: sqlite3.Cursor) -> None:
        generation = self.generation + 1
        cur.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('generation', ?)", (json.dumps(generation),))
        self.meta = {**self.meta, "generation": generation}

    def delete_document(self, doc_id: str) -> int:
        """Remove a document's passages; StoreError 404 if it has none."""
        with self.lock:
            with self._transaction() as cur:
                removed = self._delete_docs(cur, [doc_id])
                if not len(removed):
                    raise StoreError(f"document `{doc_id}` is not in index `{self.name}`", 404, "id")
            self._refresh_index(removed, np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32))
            return int(len(removed))

    # ---- reads -------------------------------------------------------------------------
    def search(self, queries: np.ndarray, top_k: int) -> list[list[Hit]]:
        """The `top_k` passages nearest each query vector, best first."""
        with self.lock:
            self._sync()
            scores, ids = self.index.search(queries, top_k)
            wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
            rows = {}
            for start in range(0, len(wanted), 500):
                part = wanted[start:start + 500]
                rows.update({r[0]: r[1:] for r in self.db.execute(
                    f"SELECT rowid, pid, doc_id, chunk, title, text, metadata FROM passages WHERE rowid IN "
                    f"({','.join('?' * len(part))})", part)})
        out = []
        for q_scores, q_ids in zip(scores, ids):
            hits = []
            for score, rowid in zip(q_scores.tolist(), q_ids.tolist()):
                if rowid >= 0 and rowid in rows:
                    pid, doc_id, chunk, title, text, metadata = rows[rowid]
                    hits.append(Hit(Passage(pid, doc_id, chunk, title, text, json.loads(metadata)), float(score)))
            out.append(hits)
        return out

    def close(self) -> None:
        with self.lock:
            self.db.close()


class CollectionStore:
    """Every collection under one root directory; names are confined to it."""

    def __init__(self, root: Path, use_gpu: bool = False) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.use_gpu = use_gpu
        self._open: dict[str, Collection] = {}
        self._lock = threading.Lock()

    def _dir(self, name: str) -> Path:
        path = (self.root / check_name(name)).resolve()
        if path.parent != self.root:
            raise StoreError("index path escapes the index root", 400, "name")
        return path

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and NAME_RE.match(p.name) and (p / "passages.sqlite").exists())

    def create(self, name: str, dim: int, embedder_name: str, index_type: str = "auto",
               chunk_words: int = CHUNK_WORDS, chunk_overlap: int = CHUNK_OVERLAP) -> Collection:
        resolve_type(index_type, 0)
        if not 0 <= chunk_overlap < chunk_words:
            raise StoreError("chunk_overlap must be >= 0 and below chunk_words", 400, "chunk_overlap")
        path = self._dir(name)
        with self._lock:
            if path.exists():
                raise StoreError(f"index `{name}` already exists", 409, "name")
            # Built in a temporary directory and renamed: a crash never leaves half a collection.
            tmp = self.root / f".creating-{name}-{time.monotonic_ns()}"
            tmp.mkdir()
            Collection(tmp, dim, index_type, chunk_words, chunk_overlap, embedder_name, create=True).close()
            tmp.rename(path)
            stale = self._open.pop(name, None)  # one another process deleted under our cache
            if stale is not None:
                with stale.lock:
                    stale.close()
            self._open[name] = Collection(path, use_gpu=self.use_gpu)
            return self._open[name]

    def get(self, name: str) -> Collection:
        path = self._dir(name)
        with self._lock:
            cached = self._open.get(name)
            current = file_id(path / "passages.sqlite")
            if cached is not None and cached.file_id == current:
                return cached
            if cached is not None:  # another process deleted the collection, or made it anew
                del self._open[name]
                with cached.lock:
                    cached.close()
            if current is None:
                raise StoreError(f"index `{name}` does not exist", 404, "index")
            self._open[name] = Collection(path, use_gpu=self.use_gpu)
            return self._open[name]

    def delete(self, name: str) -> None:
        path = self._dir(name)
        with self._lock:
            if not (path / "passages.sqlite").exists():
                raise StoreError(f"index `{name}` does not exist", 404, "index")
            collection = self._open.pop(name, None)
            if collection is not None:
                with collection.lock:
                    collection.close()
            # Renamed first so the name is free at once and a crash leaves no half-deleted index.
            trash = self.root / f".deleting-{name}-{time.monotonic_ns()}"
            path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            for collection in self._open.values():
                collection.close()
            self._open.clear()
