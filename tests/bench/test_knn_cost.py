"""bench.knn_cost end to end at a tiny size: a real build through the engine, forced flat and
IVF-PQ datastores, decode steps with and without kNN-LM, and the JSON + PNG it writes."""
from __future__ import annotations

import json

from bench.knn_cost import main, synthetic_keys


def test_synthetic_keys_keep_the_real_ones_first():
    import numpy as np

    keys = np.arange(12, dtype=np.float32).reshape(4, 3)
    out, values = synthetic_keys(keys, np.arange(4), 10, noise=0.1, seed=0)
    assert out.shape == (10, 3) and values.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert (out[:4] == keys).all() and not (out[4:8] == keys).all()  # tiled copies are perturbed


def test_knn_cost_tiny_run(model_dir, tmp_path):
    out = tmp_path / "knn_cost.json"
    main(["--model", str(model_dir), "--dtype", "float32", "--sizes", "3000", "--index-types", "flat,ivfpq",
          "--batches", "1,2", "--tokens", "4", "--build-docs", "3", "--repeats", "1", "--output", str(out)])
    doc = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert doc["build"]["tokens"] > 0 and doc["build"]["tokens_per_s"] > 0
    rows = {(r["index_type"], r["batch"]): r for r in doc["rows"]}
    assert set(rows) == {("flat", 1), ("flat", 2), ("ivfpq", 1), ("ivfpq", 2)}
    for r in rows.values():
        assert r["num_keys"] == 3000 and r["step_ms_base"] > 0 and r["step_ms_knn"] > 0 and r["search_ms"] > 0
