"""The faiss wrapper against brute force: exact search equals a NumPy cosine search in
float64 (ids and scores), IVF probing every list is exact too, HNSW's recall@10 is measured."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval.index import VectorIndex, resolve_type

DIM = 48


def unit_vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(base: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):
    scores = queries.astype(np.float64) @ base.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), ids[order]


def check_exact(index: VectorIndex, base, ids, queries, k):
    scores, got = index.search(queries, k)
    want_scores, want_ids = brute_force(base, ids, queries, k)
    # float32 dot products of unit vectors: error <= DIM * 2**-24 * (sum |x_i y_i| <= 1).
    np.testing.assert_allclose(scores, want_scores, atol=DIM * 2.0 ** -24 * 4)
    # Ids must agree except where two scores tie within that error.
    gap = np.abs(np.diff(want_scores, axis=1)) > 1e-5
    for q in range(len(queries)):
        for j in range(k):
            if (j == 0 or gap[q, j - 1]) and (j == k - 1 or gap[q, j]):
                assert got[q, j] == want_ids[q, j]


def test_flat_equals_brute_force_with_removals():
    base = unit_vectors(1500, 0)
    ids = np.arange(1000, 2500, dtype=np.int64) * 7  # sparse, caller-chosen ids
    index = VectorIndex(DIM, "flat")
    index.add(ids[:700], base[:700])
    index.add(ids[700:], base[700:])
    queries = unit_vectors(50, 1)
    check_exact(index, base, ids, queries, 10)
    drop = np.arange(0, 1500, 3)
    index.remove(ids[drop])
    keep = np.setdiff1d(np.arange(1500), drop)
    assert index.ntotal == len(keep)
    check_exact(index, base[keep], ids[keep], queries, 10)


def test_ivf_probing_every_list_is_exact(tmp_path):
    base, ids = unit_vectors(2000, 2), np.arange(2000, dtype=np.int64)
    index = VectorIndex(DIM, "ivf")
    index.rebuild(ids, base)
    assert index.is_trained_ivf
    import faiss

    faiss.extract_index_ivf(index._index.index).nprobe = faiss.extract_index_ivf(index._index.index).nlist
    check_exact(index, base, ids, unit_vectors(40, 3), 10)


def test_small_ivf_stays_exact_until_it_can_train():
    base, ids = unit_vectors(20, 4), np.arange(20, dtype=np.int64)
    index = VectorIndex(DIM, "ivf")
    index.rebuild(ids, base)
    assert not index.is_trained_ivf
    check_exact(index, base, ids, unit_vectors(5, 5), 5)


def test_hnsw_recall_at_10():
    base, ids = unit_vectors(5000, 6), np.arange(5000, dtype=np.int64)
    index = VectorIndex(DIM, "hnsw")
    index.add(ids, base)
    queries = unit_vectors(200, 7)
    _, got = index.search(queries, 10)
    _, want = brute_force(base, ids, queries, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
    print(f"HNSW (M=32, efSearch=128) recall@10 on 5000 random {DIM}-d unit vectors: {recall:.4f}")
    # Random high-dimensional vectors are HNSW's hard case; below 0.9 the parameters are wrong.
    assert recall >= 0.9


def test_save_load_round_trip(tmp_path):
    base, ids = unit_vectors(300, 8), np.arange(300, dtype=np.int64) + 5
    index = VectorIndex(DIM, "flat")
    index.add(ids, base)
    index.save(tmp_path / "x.faiss")
    again = VectorIndex.load(tmp_path / "x.faiss", DIM, "flat")
    queries = unit_vectors(10, 9)
    for a, b in zip(index.search(queries, 7), again.search(queries, 7)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        VectorIndex.load(tmp_path / "x.faiss", DIM + 1, "flat")


def test_k_beyond_contents_and_empty():
    index = VectorIndex(DIM, "flat")
    scores, got = index.search(unit_vectors(2, 10), 5)
    assert scores.shape == (2, 0) and got.shape == (2, 0)
    index.add(np.array([3, 4]), unit_vectors(2, 11))
    _, got = index.search(unit_vectors(1, 12), 5)
    assert sorted(got[0].tolist()) == [3, 4]


def test_auto_type_by_size():
    assert resolve_type("auto", 10) == "flat"
    assert resolve_type("auto", 10_000_000) == "hnsw"
    with pytest.raises(ValueError):
        resolve_type("lsh", 1)
