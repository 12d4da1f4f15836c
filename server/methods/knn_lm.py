"""kNN-LM (Khandelwal et al. 2020) as a per-step method: mix the model's next-token
distribution with one read off the nearest stored contexts.

    p_kNN(y) ∝ Σ_{i ∈ kNN} 1[v_i = y] exp(-d_i / τ),   p = λ p_kNN + (1 - λ) p_LM

in probability space at temperature 1 (as the reference's `combine_knn_and_vocab_probs`);
the request's penalties, temperature and top-k/p then apply to log p. The query is the
last layer's normalised FFN input at the sampled position (`LAST_FFN_INPUT_TAP`), the key the
datastore was built with (retrieval/datastore.py). All rows of a step that read the same
datastore go to faiss in one search (`adjust_batch`). The API layer opens the datastore and
checks it was built under the request's weights before the engine sees the request.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from server.methods.base import LogitMethod
from server.models.llama import LAST_FFN_INPUT_TAP

if TYPE_CHECKING:
    from server.engine.sequence import Request, Sequence

MAX_K = 4096


class KNNLMOptions(BaseModel):
    """`knn_lm`: interpolate with a kNN-LM datastore (`alignserve index knn-build`)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    datastore: str = Field(min_length=1, max_length=64)
    k: int = Field(64, ge=1, le=MAX_K)  # the reference uses 1024; 64 keeps CPU steps cheap
    lambda_: float = Field(0.25, ge=0.0, le=1.0, alias="lambda")
    temperature: float = Field(1.0, gt=0.0, le=1e4)
    exact: bool = True  # IVF-PQ stores: re-rank by distances from the stored keys


def mix(log_p_lm: torch.Tensor, dists: torch.Tensor, values: torch.Tensor, lam: float,
        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_mix [rows, V], p_kNN [rows, V]) from the model's log-probs and each row's
    neighbours (squared L2 distances and next-token values; value -1 = no neighbour).

    Only the ≤ k neighbours' tokens have p_kNN > 0, so log p_mix is log(1 - λ) + log p_LM
    everywhere and the log-sum-exp is taken at those tokens only: a dense logaddexp over the
    vocabulary (and the log of its zeros) cost ~40 ms per step on CPU for nothing."""
    valid = values >= 0
    scores = (-dists / temperature).masked_fill(~valid, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row without neighbours: all 0
    near = values.clamp(min=0)
    p_knn = torch.zeros_like(log_p_lm)
    p_knn.scatter_add_(1, near, weights * valid)  # duplicates of a token add up here
    log_mix = log_p_lm + (math.log1p(-lam) if lam < 1 else float("-inf"))
    lam_p_knn = p_knn.gather(1, near) * lam
    # A token listed twice is written twice with the same value; a padded -1 slot (p = 0 at
    # token 0 unless token 0 is a real neighbour) rewrites log_mix[0] with what it already is.
    log_mix.scatter_(1, near, torch.logaddexp(log_mix.gather(1, near), lam_p_knn.log()))
    return log_mix, p_knn


class KNNLM(LogitMethod):
    name = "knn_lm"
    tap_layers = (LAST_FFN_INPUT_TAP,)

    def __init__(self, options: KNNLMOptions, datastore) -> None:
        self.options = options
        self.datastore = datastore  # retrieval.datastore.Datastore, opened by the API layer
        self._knn_share: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # seq_id -> last step's (log p_mix, p_kNN)
        self.shares: list[float] = []
        self.num_matched = 0

    @classmethod
    def adjust_batch(cls, items, taps):
        """One faiss search per datastore for all the step's rows that read it."""
        by_store: dict[int, list[int]] = {}
        for i, (method, _, _) in enumerate(items):
            by_store.setdefault(id(method.datastore), []).append(i)
        out: list[Any] = [None] * len(items)
        for indices in by_store.values():
            store = items[indices[0]][0].datastore
            k = max(items[i][0].options.k for i in indices)
            exact = any(items[i][0].options.exact for i in indices)
            queries = np.concatenate([torch.stack([taps[s.seq_id][LAST_FFN_INPUT_TAP] for s in items[i][1]])
                                      .numpy() for i in indices])
            dists, values = store.search(queries, k, exact)
            row = 0
            for i in indices:
                method, seqs, logits = items[i]
                n = len(seqs)
                d = torch.from_numpy(np.ascontiguousarray(dists[row:row + n, :method.options.k])).to(logits.dtype)
                v = torch.from_numpy(np.ascontiguousarray(values[row:row + n, :method.options.k])).long()
                out[i] = method._mix(seqs, logits, d, v)
                row += n
        return out

    def adjust(self, seqs, logits, taps):
        return type(self).adjust_batch([(self, seqs, logits)], taps)[0]

    def _mix(self, seqs: list["Sequence"], logits: torch.Tensor, dists: torch.Tensor,
             values: torch.Tensor) -> tuple[list["Sequence"], torch.Tensor]:
        o = self.options
        log_p_lm = torch.log_softmax(logits, -1)
        log_mix, p_knn = mix(log_p_lm, dists, values, o.lambda_, o.temperature)
        for s, mix_row, knn_row in zip(seqs, log_mix, p_knn):
            self._knn_share[s.seq_id] = (mix_row, knn_row)
        self.num_matched += int((values >= 0).any(-1).sum())
        return seqs, log_mix.to(logits.dtype)

    def adjust_prompt(self, seq, logits: torch.Tensor, taps: dict[int, torch.Tensor]) -> torch.Tensor:
        """Prompt logprobs under the mixture: one search for all the slice's positions."""
        o = self.options
        dists, values = self.datastore.search(taps[LAST_FFN_INPUT_TAP].numpy(), o.k, o.exact)
        log_mix, _ = mix(torch.log_softmax(logits, -1), torch.from_numpy(np.ascontiguousarray(dists)).to(logits.dtype),
                         torch.from_numpy(np.ascontiguousarray(values)).long(), o.lambda_, o.temperature)
        return log_mix

    def advance(self, request: "Request") -> list:
        # The token each row sampled is known only now: its share of kNN probability.
        for seq in request.sequences:
            rows = self._knn_share.pop(seq.seq_id, None)
            if rows is not None and seq.num_output_tokens > 0:
                token = seq.token_ids[-1]  # λ p_kNN / p_mix at the sampled token
                # p_mix is 0 only for a token forced past the mixture (a bias, a constraint).
                p_mix = math.exp(float(rows[0][token]))
                self.shares.append(self.options.lambda_ * float(rows[1][token]) / p_mix if p_mix > 0 else 0.0)
        return []

    def report(self, request: "Request") -> dict[str, Any]:
        shares = np.array(self.shares) if self.shares else np.zeros(0)
        return {"datastore": self.datastore.name, "k": self.options.k, "lambda": self.options.lambda_,
                "temperature": self.options.temperature, "tokens": int(len(shares)),
                "mean_knn_weight": float(shares.mean()) if len(shares) else None,
                "max_knn_weight": float(shares.max()) if len(shares) else None,
                "tokens_mostly_knn": int((shares > 0.5).sum())}

    def detach(self, request: "Request") -> None:
        self._knn_share.clear()
