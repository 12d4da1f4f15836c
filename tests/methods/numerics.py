"""How far the float32 engine may sit from a float64 reference, derived from a rounding model.

Method tests run HF transformers in float64 as the truth (its own rounding, ~1e-16, is
ignored) and compare the engine's float32 outputs with bounds computed here, so a test holds
on any CPU (AVX2, AVX-512, AMX) and any summation order, and tightens or loosens with the
actual magnitudes of each step instead of one hand-picked constant.

Rounding model (the probabilistic bound of Higham & Mary, SIAM J. Sci. Comput. 2019): an fp32
dot product of length n errs by at most about sqrt(n) * u * |x| |y|, u = 2^-24.
- Hidden state: each decoder layer's longest reduction has n = intermediate_size, and the
  layers' rounding errors are independent, so after j layers |dh| <= sqrt(j * d_ff) * u * |h|.
- A head row w sees that error projected on its own direction: for an error vector with no
  preferred direction |w . dh| ~ |w| |dh| / sqrt(d), and the largest of V such projections is
  below sqrt(2 ln 2V) times that; the head's own matmul adds sqrt(d) * u * |w| |h|.
Measured on SmolLM2-135M (fp32 HF against fp64 on AVX-512), |dh| is ~8x and the logit error
~30x below these bounds, and the engine's DoLa and GenARM log-probs 100-1000x below theirs
(the bounds are worst cases; log_softmax cancels most of a shared error). That leaves room for
any kernel's summation order, while the tolerances stay at 0.01-0.1 nats: the neighbouring
DoLa layer, twice its relative_top, the other final-norm setting, or a GenARM alpha off by
10% break them at a third or more of the steps.

Propagation: log_softmax(z)_v = z_v - logsumexp(z) moves by at most |dz_v| + max|dz|, i.e.
2 * max|dz|. Log-probs are compared where p >= P_TAIL; below it the probabilities themselves
are compared, to P_TAIL times the same relative error (the far tail never matters for
sampling, and p = 0 there, as for -9999 = masked, compares cleanly).
"""
from __future__ import annotations

import math

import torch

U32 = 2.0 ** -24  # float32 unit roundoff
P_TAIL = 1e-4


def logit_error(h_norm: float, row_norm: float, num_layers: int, hidden_size: int,
                intermediate_size: int, num_rows: int) -> float:
    """Bound on max over `num_rows` head rows of |dz| for a hidden state after `num_layers`
    fp32 layers, whose float64 norm is `h_norm`, under rows of norm <= `row_norm`."""
    hidden_rel = math.sqrt(num_layers * intermediate_size) * U32
    largest = math.sqrt(2.0 * math.log(2.0 * num_rows))  # max of num_rows projections
    projected = hidden_rel * largest / math.sqrt(hidden_size)
    own = math.sqrt(hidden_size) * U32
    return row_norm * h_norm * (projected + own)


class HeadErrors:
    """`logit_error` for one model's LM head (or any linear head on its hidden states)."""

    def __init__(self, weight: torch.Tensor, hidden_size: int, intermediate_size: int) -> None:
        self.row_norm = float(weight.detach().double().norm(dim=-1).max())
        self.num_rows = weight.shape[0]
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size

    def __call__(self, hidden: torch.Tensor, num_layers: int) -> float:
        """Max |dz| over the head's outputs for `hidden` ([hidden_size], float64)."""
        return logit_error(float(hidden.norm()), self.row_norm, num_layers, self.hidden_size,
                           self.intermediate_size, self.num_rows)


def logprob_mismatches(ours: list[tuple[int, float]], ref: torch.Tensor, tol: float) -> list[tuple]:
    """(token, ours, reference) for each of ours off `ref` (float64 log-probs over the
    vocabulary) by more than `tol` in log space where p >= P_TAIL, P_TAIL * tol in p below."""
    bad = []
    for token, value in ours:
        expected = float(ref[token])
        if expected >= math.log(P_TAIL):
            ok = abs(value - expected) <= tol
        else:
            # A masked token is reported as -9999 (exp: 0.0), its reference is -inf (0.0).
            ok = abs(math.exp(value) - math.exp(expected)) <= P_TAIL * tol
        if not ok:
            bad.append((token, value, expected))
    return bad


def argmax_is_decided(scores: torch.Tensor, tol: float) -> bool:
    """True when the top-2 gap of `scores` exceeds 2 * tol: entries each off by <= `tol`
    cannot swap the argmax (the near-tie rule of tests/engine/oracle.py, with a derived width)."""
    top2 = scores.topk(2).values
    return float(top2[0] - top2[1]) > 2.0 * tol
