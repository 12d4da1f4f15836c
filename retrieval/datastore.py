"""kNN-LM datastores: (key = the model's hidden state at a position, value = the next token)
pairs of a corpus, on disk, with a faiss L2 index over the keys.

Keys are the last decoder layer's normalised FFN input (`LAST_FFN_INPUT_TAP`, the reference's
`last_ffn_input`), stored as float16; values are int32 token ids. A flat L2 index below
`FLAT_MAX_KEYS`, IVF-PQ above (trained on a sample); `exact` search re-ranks the candidates by
distances recomputed from the stored keys (the lesson of urvashik/knnlm#4).

A datastore is only meaningful for the weights that made it: it records the base model's and
the adapter's fingerprints, the key type and the tokenizer, and `check_compatible` refuses
any other pairing (knn-transformers#14: a mismatched store makes perplexity worse).
Files are written to a temporary directory and renamed, so a crash leaves no half store.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.index import fsync_dir
from retrieval.store import StoreError, check_name

KEY_TYPE = "last_ffn_input"
FLAT_MAX_KEYS = 200_000
IVF_TRAIN_SAMPLE = 100_000
KIND = "knn_datastore"
FLAT_QUERY_CHUNK = 64


def tensor_fingerprint(tensors: list[torch.Tensor]) -> str:
    """SHA-256 over the tensors' values rounded to bfloat16, in order: the same weights served
    in float32 or bf16 (`--dtype auto` differs by machine) give the same fingerprint."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu").to(torch.bfloat16).to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def model_fingerprint(model) -> str:
    """The base weights, sampled: the embedding and the last layer fix the keys' space and the
    values' vocabulary; hashing every projection would take seconds for nothing more."""
    last = model.layers[-1]
    return tensor_fingerprint([model.embed.weight[:: max(1, model.embed.weight.shape[0] // 512)],
                               last.ffn_norm.weight, model.norm.weight])


def adapter_fingerprint(weights) -> str | None:
    """An adapter's full LoRA weights (None: the base model)."""
    if weights is None:
        return None
    tensors = [t for key in sorted(weights.weights) for t in weights.weights[key]]
    return tensor_fingerprint(tensors) + f"-s{weights.scaling:g}"


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.hf.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode("utf-8")).hexdigest()[:32]


@dataclass
class Datastore:
    path: Path
    meta: dict[str, Any]
    keys: np.ndarray  # [n, dim] float16 (memory-mapped)
    values: np.ndarray  # [n] int32
    index: Any  # faiss index over float32 keys
    _flat: tuple[torch.Tensor, torch.Tensor] | None = None  # flat stores: (keys view, squared norms)

    @property
    def name(self) -> str:
        return self.path.name

    def info(self) -> dict[str, Any]:
        return {"object": "index", "name": self.name, "kind": KIND, "index_type": self.meta["index_type"],
                "num_keys": int(len(self.values)), "dim": int(self.keys.shape[1]), "key_type": self.meta["key_type"],
                "adapter": self.meta["adapter"], "created_at": self.meta["created_at"],
                "num_documents": self.meta["num_documents"]}

    def check_compatible(self, model_fp: str, adapter_fp: str | None, tokenizer_fp: str, adapter_name: str | None):
        """StoreError 409 unless this store was built by these weights and this tokenizer."""
        m = self.meta
        if m["model_fingerprint"] != model_fp or m["tokenizer_fingerprint"] != tokenizer_fp:
            raise StoreError(f"datastore `{self.name}` was built with another base model or tokenizer", 409,
                             "knn_lm.datastore")
        if m["adapter_fingerprint"] != adapter_fp:
            built = f"adapter `{m['adapter']}`" if m["adapter"] else "the base model"
            used = f"adapter `{adapter_name}`" if adapter_name else "the base model"
            raise StoreError(f"datastore `{self.name}` was built under {built}; this request runs {used}", 409,
                             "knn_lm.datastore")

    def search(self, queries: np.ndarray, k: int, exact: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances [q, k], values [q, k]); value -1 where fewer than k keys.

        `exact`: faiss proposes 2k candidates (4k from IVF-PQ's compressed codes) and the k
        nearest are chosen by distances recomputed from the stored keys, in float64 and the
        queries' own precision, so the distances are the formula's, not faiss's float32 (or
        quantised) ones."""
        k = min(k, len(self.values))
        wanted = min(len(self.values), (4 if self.meta["index_type"] == "ivfpq" else 2) * k) if exact else k
        queries32 = np.ascontiguousarray(queries, dtype=np.float32)
        if self.meta["index_type"] == "flat":
            dists, ids = self._flat_search(queries32, wanted)
        else:
            dists, ids = self.index.search(queries32, wanted)
        if exact:
            q64 = np.asarray(queries, dtype=np.float64)
            dists = np.full(ids.shape, np.inf)
            for q, row in enumerate(ids):
                ok = row >= 0
                diff = self.keys[row[ok]].astype(np.float64) - q64[q]
                dists[q, ok] = np.einsum("ij,ij->i", diff, diff)
            order = np.argsort(dists, axis=1, kind="stable")[:, :k]
            ids, dists = np.take_along_axis(ids, order, 1), np.take_along_axis(dists, order, 1)
        values = np.where(ids >= 0, self.values[np.clip(ids, 0, None)], -1)
        return dists, values

    def _flat_search(self, queries: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force L2 as one matmul and a top-k over faiss's own float32 copy of the keys
        (no second copy): 2-3x faster than faiss's flat scan on CPU at 100k-1M keys, where
        faiss searches few queries one at a time."""
        import faiss

        if self._flat is None:
            n, dim = self.index.ntotal, self.index.d
            keys = torch.from_numpy(faiss.rev_swig_ptr(self.index.get_xb(), n * dim)).view(n, dim)
            self._flat = (keys, (keys * keys).sum(1))
        keys, norms = self._flat
        dists, ids = [], []
        for start in range(0, len(queries), FLAT_QUERY_CHUNK):  # bounds the [q, n] distance matrix
            q = torch.from_numpy(queries[start:start + FLAT_QUERY_CHUNK])
            d = torch.addmm(norms[None], q, keys.T, alpha=-2.0).add_((q * q).sum(1, keepdim=True))
            top = d.topk(m, dim=1, largest=False, sorted=True)
            dists.append(top.values.numpy())
            ids.append(top.indices.numpy())
        return np.concatenate(dists), np.concatenate(ids)


INDEX_TYPES = ("auto", "flat", "ivfpq")


def check_index_type(index_type: str) -> str:
    """StoreError 400 unless `index_type` is one `build_index` knows."""
    if index_type not in INDEX_TYPES:
        raise StoreError(f"index_type must be one of {', '.join(INDEX_TYPES)}", 400, "index_type")
    return index_type


def build_index(keys: np.ndarray, index_type: str = "auto", nprobe: int = 32):
    """(faiss index, "flat" | "ivfpq") over `keys`; "auto": flat up to FLAT_MAX_KEYS."""
    import faiss

    n, dim = keys.shape
    if index_type == "flat" or (index_type == "auto" and n <= FLAT_MAX_KEYS):
        index = faiss.IndexFlatL2(dim)
        index.add(keys.astype(np.float32))
        return index, "flat"
    nlist = int(min(4096, max(64, 4 * np.sqrt(n))))
    m = next(m for m in (64, 48, 32, 24, 16, 8) if dim % m == 0)
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, m, 8)
    sample = keys[np.random.default_rng(0).choice(n, min(n, IVF_TRAIN_SAMPLE), replace=False)]
    index.train(sample.astype(np.float32))
    for start in range(0, n, 100_000):
        index.add(keys[start:start + 100_000].astype(np.float32))
    index.nprobe = nprobe
    return index, "ivfpq"


def write_datastore(root: Path, name: str, keys: np.ndarray, values: np.ndarray, meta: dict[str, Any],
                    index_type: str = "auto") -> Datastore:
    """Save keys (float16), values and the index under root/name, atomically."""
    import faiss

    check_name(name)
    check_index_type(index_type)
    root = Path(root).resolve()
    path = root / name
    if path.exists():
        raise StoreError(f"index `{name}` already exists", 409, "name")
    tmp = root / f".building-{name}-{time.monotonic_ns()}"
    tmp.mkdir(parents=True)
    keys16 = keys.astype(np.float16)
    np.save(tmp / "keys.npy", keys16)
    np.save(tmp / "values.npy", values.astype(np.int32))
    # NOTE: the index is built over the float16-rounded keys, the ones exact search reads.
    index, index_type = build_index(keys16.astype(np.float32), index_type)
    faiss.write_index(index, str(tmp / "index.faiss"))
    meta = {**meta, "kind": KIND, "key_type": KEY_TYPE, "index_type": index_type, "num_keys": int(len(values)),
            "dim": int(keys.shape[1]), "created_at": int(time.time())}
    (tmp / "datastore.json").write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    tmp.rename(path)
    fsync_dir(root)
    return open_datastore(path)


def open_datastore(path: Path) -> Datastore:
    import faiss

    meta = json.loads((path / "datastore.json").read_text())
    keys = np.load(path / "keys.npy", mmap_mode="r")
    values = np.load(path / "values.npy")
    index = faiss.read_index(str(path / "index.faiss"))
    if meta["index_type"] == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = meta.get("nprobe", 32)
    return Datastore(path, meta, keys, values, index)


def is_datastore(path: Path) -> bool:
    return (path / "datastore.json").exists()


def remove_datastore(path: Path) -> None:
    trash = path.with_name(f".deleting-{path.name}-{time.monotonic_ns()}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)
