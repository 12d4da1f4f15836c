"""What the server and the CLI call: collections plus the embedder, as blocking calls.

The HTTP layer runs these in worker threads (never on the event loop or the engine thread);
the CLI calls them directly. Documents are chunked and embedded before a collection's lock
is taken, so a large upload does not stall searches on the same collection.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from retrieval.chunking import Document, DocumentError, make_document
from retrieval.embedder import Embedder
from retrieval.store import CollectionStore, Hit, StoreError, file_id

MAX_TOP_K = 100
MAX_DOC_CHARS = 1_000_000
EMBED_BATCH = 64


def default_root() -> Path:
    import os

    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "alignserve" / "indexes"


class Retrieval:
    """RAG collections and kNN-LM datastores under one root (one namespace of names)."""

    def __init__(self, root: Path, embedder: Embedder | None = None, use_gpu: bool = False) -> None:
        self.store = CollectionStore(root, use_gpu=use_gpu)
        self.embedder = embedder or Embedder()
        self._datastores: dict[str, Any] = {}
        self._lock = threading.Lock()

    # ---- kNN-LM datastores ---------------------------------------------------------------
    def datastore(self, name: str):
        """An open datastore (opened once, kept); StoreError 404 if there is none by that name."""
        from retrieval.datastore import is_datastore, open_datastore

        path = self.store._dir(name)
        with self._lock:
            # Checked on every use, as collections are: another process (a replica over the same
            # root) may have removed the datastore or built a new one under the name.
            current = file_id(path / "datastore.json")
            cached = self._datastores.get(name)
            if cached is not None and cached[0] == current:
                return cached[1]
            self._datastores.pop(name, None)
            if current is None or not is_datastore(path):
                raise StoreError(f"datastore `{name}` does not exist", 404, "datastore")
            self._datastores[name] = (current, open_datastore(path))
            return self._datastores[name][1]

    def datastore_names(self) -> list[str]:
        from retrieval.datastore import is_datastore

        return sorted(p.name for p in self.store.root.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and is_datastore(p))

    def create(self, name: str, index_type: str = "auto", chunk_words: int = 100,
               chunk_overlap: int = 20) -> dict[str, Any]:
        try:
            collection = self.store.create(name, self.embedder.dim, self.embedder.name, index_type,
                                           chunk_words, chunk_overlap)
        except ValueError as exc:
            raise StoreError(str(exc), 400, "index_type") from exc
        return collection.info()

    def info(self, name: str) -> dict[str, Any]:
        if name in self.datastore_names():
            return self.datastore(name).info()
        return self.store.get(name).info()

    def list(self) -> list[dict[str, Any]]:
        out = []
        for name in self.store.names():
            try:
                out.append(self.store.get(name).info())
            except StoreError:
                continue  # deleted meanwhile
        for name in self.datastore_names():
            try:
                out.append(self.datastore(name).info())
            except (StoreError, OSError):
                continue
        return sorted(out, key=lambda i: i["name"])

    def delete(self, name: str) -> None:
        from retrieval.datastore import remove_datastore

        if name in self.datastore_names():
            with self._lock:
                self._datastores.pop(name, None)
                remove_datastore(self.store._dir(name))
            return
        self.store.delete(name)

    def documents(self, raw: Iterable[dict[str, Any]]) -> list[Document]:
        return [make_document(d, MAX_DOC_CHARS) for d in raw]

    def add(self, name: str, docs: list[Document],
            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Chunk, embed and insert; `progress(n)` after each batch of n passages embedded."""
        if not docs:
            raise DocumentError("no documents given")
        # One id twice in a request: the later one wins, as it would over two requests.
        docs = list({d.id: d for d in docs}.values())
        collection = self.store.get(name)
        passages = collection.chunk(docs)
        vectors = []
        for start in range(0, len(passages), EMBED_BATCH):
            batch = passages[start:start + EMBED_BATCH]
            vectors.append(self.embedder.encode([_embed_text(p.title, p.text) for p in batch]))
            if progress is not None:
                progress(len(batch))
        import numpy as np

        result = collection.add(passages, np.concatenate(vectors))
        return {"object": "index.documents", "index": name, **result}

    def delete_document(self, name: str, doc_id: str) -> dict[str, Any]:
        removed = self.store.get(name).delete_document(doc_id)
        return {"object": "index.document", "index": name, "id": doc_id, "deleted": True,
                "removed_passages": removed}

    def search(self, name: str, query: str, top_k: int, min_score: float | None = None) -> list[Hit]:
        check_top_k(top_k)
        if not isinstance(query, str) or not query.strip():
            raise StoreError("query must be a non-empty string", 400, "query")
        collection = self.store.get(name)
        hits = collection.search(self.embedder.encode([query]), top_k)[0]
        return [h for h in hits if min_score is None or h.score >= min_score]

    def close(self) -> None:
        self.store.close()


def check_top_k(top_k: int) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise StoreError(f"top_k must be an integer in [1, {MAX_TOP_K}]", 400, "top_k")


def _embed_text(title: str, text: str) -> str:
    # Titles carry the entity a passage is about; DPR and RAG embed "title / text" the same way.
    return f"{title} / {text}" if title else text
