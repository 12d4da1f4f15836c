"""Build a kNN-LM datastore by teacher-forced prefill of a corpus through our engine.

Each document is cut into windows of `context_window` tokens; every window is one prefill
request asking for `LAST_FFN_INPUT_TAP` at each prompt position (server/engine: prompt taps,
computed in full, batched and chunked by the scheduler like any prompt). The key at position t
is paired with token t + 1 (the window's last key with the document's next token, when there
is one). The engine and its adapter are the ones whose fingerprints the datastore records.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from retrieval.datastore import Datastore, check_index_type, adapter_fingerprint, model_fingerprint, tokenizer_fingerprint, write_datastore
from retrieval.store import StoreError

IN_FLIGHT = 16  # windows queued at once: enough to fill a step's token budget


def windows(token_ids: list[int], size: int) -> list[tuple[list[int], int | None]]:
    """(window, the token after it or None) covering `token_ids`."""
    out = []
    for start in range(0, len(token_ids) - 1, size):
        window = token_ids[start:start + size]
        nxt = token_ids[start + size] if start + size < len(token_ids) else None
        if len(window) >= 2 or nxt is not None:
            out.append((window, nxt))
    return out


def collect_keys(engine, texts: list[str], adapter_id: int = 0, context_window: int = 512,
                 progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keys [n, hidden] float32, values [n] int64) of every position of every text."""
    from server.engine.sequence import SamplingParams
    from server.models.llama import LAST_FFN_INPUT_TAP

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_taps=(LAST_FFN_INPUT_TAP,))
    jobs = [w for text in texts for w in windows(engine.tokenizer.encode(text), context_window)]
    keys: list[np.ndarray] = []
    values: list[np.ndarray] = []
    pending: dict[str, tuple[list[int], int | None]] = {}
    counter = itertools.count()
    queue = iter(jobs)
    while True:
        while len(pending) < IN_FLIGHT:
            job = next(queue, None)
            if job is None:
                break
            rid = f"knn-build-{next(counter)}"
            pending[rid] = job
            engine.add_request(rid, job[0], params, adapter_id)
        if not pending:
            break
        for delta in engine.step():
            if delta.extra and "prompt_taps" in delta.extra:
                window, nxt = pending.pop(delta.request_id)
                rows = delta.extra["prompt_taps"][LAST_FFN_INPUT_TAP].numpy()
                follow = window[1:] + ([nxt] if nxt is not None else [])
                keys.append(rows[:len(follow)])
                values.append(np.array(follow, dtype=np.int64))
                if progress is not None:
                    progress(len(window))
    if not keys:
        raise StoreError("the corpus holds no tokens to index", 400, "corpus")
    return np.concatenate(keys).astype(np.float32), np.concatenate(values)


def build_datastore(engine, root: Path, name: str, texts: list[str], adapter_name: str | None = None,
                    context_window: int = 512, progress: Callable[[int], None] | None = None,
                    index_type: str = "auto") -> Datastore:
    check_index_type(index_type)  # before the build, not after it
    adapter_id = engine.resolve_adapter(adapter_name) if adapter_name else 0
    weights = engine.adapters.get(adapter_name).weights if adapter_name else None
    keys, values = collect_keys(engine, texts, adapter_id, context_window, progress)
    meta = {"model_fingerprint": model_fingerprint(engine.runner.model), "adapter": adapter_name,
            "adapter_fingerprint": adapter_fingerprint(weights),
            "tokenizer_fingerprint": tokenizer_fingerprint(engine.tokenizer),
            "dtype": str(engine.dtype).removeprefix("torch."), "context_window": context_window,
            "num_documents": len(texts)}
    return write_datastore(root, name, keys, values, meta, index_type)
