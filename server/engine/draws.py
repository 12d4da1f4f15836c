"""Counter-based random draws for sampling: per-sequence streams without generator state.

In: a sequence's seed and how many draws it has made (`Sequence.seed`, `Sequence.num_draws`).
Out: a 64-bit key per draw (`draw_key`, plain Python ints) and, vectorized over rows, the
Exp(1) noise of an exponential race for any vocabulary ids (`race_noise`, torch). A draw is a
pure function of (seed, draw index, vocab id), so a seeded row samples the same token whatever
else is in the batch, on any device, and its noise can be computed for a window of candidate
ids only. It does not pick tokens (server/engine/sampler.py does).

Keys are SplitMix64 (Steele, Lea & Flood 2014): key = mix64(mix64(seed) + (draw + 1) * GAMMA).
The noise hash runs in 32-bit lanes, which vectorize on CPUs where int64 multiplies do not:
h = low32(low32(v * GOLDEN32 + key_lo) ^ key_hi), with low32 Wellons' "lowbias32" bijection;
u = (top 23 bits of h + 0.5) / 2**23; noise[v] = -log(u).
"""
from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
GOLDEN32 = 0x9E3779B9
LOW1 = 0x7FEB352D
LOW2 = 0x846CA68B
U_BITS = 23  # NOTE: (k + 0.5) * 2**-23 is exact in float32 and lies in (0, 1): -log(u) > 0


def mix64(z: int) -> int:
    """SplitMix64's finalizer on an unsigned 64-bit int."""
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def draw_key(seed: int, draw: int) -> int:
    """The key of a sequence's `draw`-th draw (unsigned 64-bit)."""
    return mix64((mix64(seed & MASK64) + (draw + 1) * GAMMA) & MASK64)


def _int32(value: int) -> int:
    """An unsigned 32-bit value as the int32 with the same bits."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _shift_xor_(z: torch.Tensor, tmp: torch.Tensor, shift: int) -> None:
    """z ^= z >>> shift (logical shift: torch's >> is arithmetic, so mask the sign fill)."""
    torch.bitwise_right_shift(z, shift, out=tmp)
    tmp.bitwise_and_((1 << (32 - shift)) - 1)
    z.bitwise_xor_(tmp)


def _low32_(z: torch.Tensor, tmp: torch.Tensor) -> None:
    """Wellons' lowbias32 on int32 lanes, in place."""
    _shift_xor_(z, tmp, 16)
    z.mul_(_int32(LOW1))
    _shift_xor_(z, tmp, 15)
    z.mul_(_int32(LOW2))
    _shift_xor_(z, tmp, 16)


def race_noise(keys: list[int], vocab_ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise for each row's draw at the given vocabulary ids.

    Args:
        keys: one `draw_key` per row.
        vocab_ids: integer ids, [vocab] (the same ids for every row) or [rows, n].
    Returns:
        float32 [rows, vocab] or [rows, n], on vocab_ids' device.
    """
    # NOTE: int32 multiply and add wrap modulo 2**32 on CPU and CUDA, which is the hash's
    # arithmetic; tests/engine/test_tokenizer_sampler.py checks the bits against numpy uint32.
    device = vocab_ids.device
    key_lo = torch.tensor([_int32(k & 0xFFFFFFFF) for k in keys], dtype=torch.int32, device=device)[:, None]
    key_hi = torch.tensor([_int32(k >> 32) for k in keys], dtype=torch.int32, device=device)[:, None]
    z = vocab_ids.to(torch.int32) * _int32(GOLDEN32) + key_lo  # [rows, n]
    tmp = torch.empty_like(z)
    _low32_(z, tmp)
    z.bitwise_xor_(key_hi)
    _low32_(z, tmp)
    z.bitwise_right_shift_(32 - U_BITS).bitwise_and_((1 << U_BITS) - 1)
    u = z.to(torch.float32).add_(0.5).mul_(2.0 ** -U_BITS)
    return u.log_().neg_()
