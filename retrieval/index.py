"""A faiss index over 64-bit ids: exact inner product (flat), HNSW or IVF, on CPU or GPU.

Shared by RAG collections and kNN-LM datastores. Inner product over unit vectors is cosine;
`metric="l2"` serves kNN-LM's squared L2 distances. The wrapper owns which faiss structure
backs an index and the operations faiss does not offer everywhere (removing ids from HNSW
means rebuilding from the caller's vectors), so callers only see add / remove / search.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf")
AUTO_FLAT_MAX = 200_000  # below this many vectors an exact search is fast enough (~ms)
HNSW_M = 32
HNSW_EF_SEARCH = 128
IVF_MIN_TRAIN = 39  # faiss's own floor of training points per list


def _faiss():
    import faiss

    return faiss


def resolve_type(index_type: str, num_vectors: int) -> str:
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type must be one of {INDEX_TYPES}")
    if index_type == "auto":
        return "flat" if num_vectors <= AUTO_FLAT_MAX else "hnsw"
    return index_type


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class VectorIndex:
    """Vectors of one dimension under caller-chosen int64 ids."""

    def __init__(self, dim: int, index_type: str = "flat", metric: str = "ip", use_gpu: bool = False) -> None:
        if metric not in ("ip", "l2"):
            raise ValueError("metric must be 'ip' or 'l2'")
        self.dim, self.index_type, self.metric = dim, index_type, metric
        self.use_gpu = use_gpu and gpu_available() and index_type == "flat"
        self._index = self._empty()
        self._gpu = None

    # ---- structure -------------------------------------------------------------------
    def _metric(self) -> int:
        faiss = _faiss()
        return faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2

    def _empty(self, train: np.ndarray | None = None):
        faiss = _faiss()
        if self.index_type == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, HNSW_M, self._metric())
            inner.hnsw.efSearch = HNSW_EF_SEARCH
        elif self.index_type == "ivf" and train is not None and len(train) >= IVF_MIN_TRAIN:
            nlist = max(1, min(int(4 * np.sqrt(len(train))), len(train) // IVF_MIN_TRAIN))
            quantizer = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
            inner = faiss.IndexIVFFlat(quantizer, self.dim, nlist, self._metric())
            inner.train(train)
            inner.nprobe = max(1, nlist // 8)
        else:
            # NOTE: an IVF index with too few vectors to train on is exact until it has enough.
            inner = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        return faiss.IndexIDMap2(inner)

    @property
    def is_trained_ivf(self) -> bool:
        return self.index_type == "ivf" and "IVF" in type(_faiss().downcast_index(self._index.index)).__name__

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    # ---- contents --------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        self._index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        self._gpu = None

    def rebuild(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the contents with exactly these vectors (IVF retrains on them)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        self._index = self._empty(vectors if self.index_type == "ivf" else None)
        if len(vectors):
            self.add(ids, vectors)
        self._gpu = None

    def can_remove(self) -> bool:
        return self.index_type != "hnsw"  # HNSW graphs cannot drop nodes: the caller rebuilds

    def remove(self, ids: np.ndarray) -> None:
        if not self.can_remove():
            raise NotImplementedError("HNSW indexes are rebuilt, not edited")
        self._index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
        self._gpu = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k], ids [q, k]); id -1 where fewer than k vectors exist. Scores are inner
        products (ip) or squared L2 distances (l2)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, min(k, self.ntotal)) if self.ntotal else 1
        if self.ntotal == 0:
            return (np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64))
        index = self._index
        if self.use_gpu:
            if self._gpu is None:
                faiss = _faiss()
                self._gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, self._index)
            index = self._gpu
        return index.search(queries, k)

    # ---- files -----------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write atomically: a crash leaves either the old file or the new one, whole."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        _faiss().write_index(self._index, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)

    @classmethod
    def load(cls, path: Path, dim: int, index_type: str, metric: str = "ip", use_gpu: bool = False) -> "VectorIndex":
        index = cls(dim, index_type, metric, use_gpu)
        index._index = _faiss().read_index(str(path))
        if index._index.d != dim:
            raise ValueError(f"{path} holds {index._index.d}-d vectors, expected {dim}")
        return index


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
