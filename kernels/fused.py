"""Fused elementwise ops of the decoder, routed: C++ on CPU, the torch twin everywhere else.

- `rms_norm`: the residual add and the RMSNorm after it (one pass instead of ~8 ops);
- `silu_and_mul`: silu(gate) * up over the fused gate|up projection;
- `rotary_and_cache`: rotary embedding of q and k in place in the qkv projection, and the
  write of k and v into their cache slots;
- `argmax_rows`: each row's argmax, for the sampler's greedy picks and exponential races (no
  rounding: the C++ one equals torch.argmax exactly, ties and NaN included).

The C++ versions (kernels/csrc/fused_cpu.cpp, built by kernels.cpu_ext) take float32, bf16
and fp16 on CPU under the "auto" kernel backend; "torch" forces the twins (the oracle route),
and so do float64 (oracle tests), CUDA and a machine where the extension did not build. Both
compute in float32; the C++ ops round once per output where a chain of torch ops rounds after
each op, so in 16-bit they are the more exact of the two (tests/kernels/test_fused_cpu.py
bounds both against float64).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels import cpu_ext, dispatch
from kernels.paged_attention_cpu import CPUAttentionPlan


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h) * weight) with h = x + residual (rounded to x's dtype), or h = x.

    x, residual: [..., hidden]; weight: [hidden] in x's dtype. h is a new tensor: the
    residual stream's earlier values may be taps that must not change.
    """
    ext = cpu_ext.kernels_for(x, backend)
    if ext is None or weight.dtype != x.dtype:
        h = x if residual is None else x + residual
        return h, F.rms_norm(h, (h.shape[-1],), weight, eps)
    if x.dim() != 2 or not x.is_contiguous() or (residual is not None and not residual.is_contiguous()):
        # The kernel takes contiguous 2-D rows (DoLa passes one vector). At decode sizes the
        # per-call Python is the cost, so the usual 2-D case skips this.
        flat = residual.reshape(-1, x.shape[-1]).contiguous() if residual is not None else None
        h, normed = rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight, eps, flat, backend)
        return (x if residual is None else h.view(x.shape)), normed.view(x.shape)
    normed = torch.empty_like(x)
    if residual is None:
        ext.rms_norm(normed, x[:0], x, x[:0], weight, eps)  # empty residual / sum: norm of x alone
        return x, normed
    h = torch.empty_like(x)
    ext.rms_norm(normed, h, x, residual, weight, eps)
    return h, normed


def silu_and_mul(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up where gate_up = [gate | up] along the last dim: [..., 2 I] -> [..., I]."""
    ext = cpu_ext.kernels_for(gate_up, backend)
    if ext is None:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    if gate_up.dim() != 2 or not gate_up.is_contiguous():
        shape = gate_up.shape
        return silu_and_mul(gate_up.reshape(-1, shape[-1]).contiguous(), backend).view(*shape[:-1], shape[-1] // 2)
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    ext.silu_and_mul(out, gate_up)
    return out


@dataclass
class RopeStep:
    """A step's rotary inputs: its positions and the model's float32 cos / signed-sin tables
    [max_positions, head_dim] (signed_sin: sin with its first half negated)."""

    positions: torch.Tensor  # [tokens] int64
    cos: torch.Tensor
    signed_sin: torch.Tensor
    dtype: torch.dtype  # the activations'
    _gathered: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin of this step's positions in the activation dtype, [tokens, 1, head_dim]
        (the twin's tables; made once per step, shared by every layer)."""
        if self._gathered is None:
            self._gathered = (self.cos[self.positions].to(self.dtype)[:, None, :],
                              self.signed_sin[self.positions].to(self.dtype)[:, None, :])
        return self._gathered


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin over [tokens, heads, head_dim]: rotate_half(x) * sin ==
    roll(x, half) * signed_sin (a sign flip rounds nothing), one op instead of four."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def rotary_and_cache(qkv: torch.Tensor, rope: RopeStep, num_heads: int, num_kv_heads: int, head_dim: int,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                     backend: str = "auto", plan: CPUAttentionPlan | None = None) -> torch.Tensor:
    """Rotate q and k of qkv [tokens, (heads + 2 kv_heads) * head_dim], write k and v into their
    cache slots; return q [tokens, heads, head_dim] (a view of qkv on the C++ route).

    The C++ route needs a CPU plan: then every slot is a real one (the runner never skips).
    """
    ext = cpu_ext.kernels_for(qkv, backend) if plan is not None and qkv.dtype == k_cache.dtype else None
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    if ext is None:
        qk = rotate(qkv[:, :q_size + kv_size].view(-1, num_heads + num_kv_heads, head_dim), *rope.gathered())
        q, k = qk.split([num_heads, num_kv_heads], dim=1)
        v = qkv[:, q_size + kv_size:].view(-1, num_kv_heads, head_dim)
        dispatch.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping, backend=backend, plan=plan)
        return q
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    ext.rotary_and_cache(qkv, rope.positions, rope.cos, rope.signed_sin, slot_mapping, k_cache, v_cache,
                         num_heads, num_kv_heads)
    return qkv[:, :q_size].view(-1, num_heads, head_dim)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of 2-D rows: the first index of each row's largest value, a NaN counting as
    largest. C++ for float32 rows on CPU (torch's was a batch-64 step's whole sampling phase,
    3.3-3.5 ms: bench/results/step_profile_sampler_argmax_*); torch elsewhere."""
    ok = x.dim() == 2 and x.dtype == torch.float32 and x.shape[1] > 0 and x.stride(1) == 1
    ext = cpu_ext.kernels_for(x, "auto") if ok else None
    if ext is None:
        return x.argmax(-1)
    out = torch.empty(x.shape[0], dtype=torch.long)
    ext.argmax_rows(out, x)
    return out
