"""Decoder for the Llama / Mistral / Qwen2 family over a paged KV cache.

Input is one flat ragged batch (no padding between sequences): token ids, positions and attention
metadata for every sequence of the step. Attention goes through kernels.dispatch
(Triton on CUDA, the planned CPU path on CPU); the elementwise ops (residual add + RMSNorm,
SiLU-and-mul, rotary + KV write) through kernels.fused (C++ on CPU). What depends only on the
step (rotary inputs, the attention plan) is made once per step, not once per layer. Output is
the final hidden state per token and optionally the hidden states of chosen layers (taps).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dispatch, fused
from server.models.config import ModelConfig

LoRAStacks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # lora_a, lora_b, scales
FINAL_NORM_TAP = -1  # tap key: the hidden state after the final norm (what the LM head reads)
EMBED_TAP = -2  # tap key: the embedding output, before layer 0
# tap key: the last layer's feed-forward input, after its pre-FFN norm (kNN-LM's key, the
# reference's `last_ffn_input`): not the residual stream, not what the LM head reads.
LAST_FFN_INPUT_TAP = -3
ROW_BUCKET_FROM = 64  # decode batches (at most max_num_seqs rows) repeat their row counts anyway


@dataclass
class LoRABatch:
    """Per-token adapter slots of a step and where to find each module's stacked weights."""

    indices: torch.Tensor  # [num_tokens] int64 slot per token, -1 = base model
    stacks: Callable[[int, str], LoRAStacks | None]  # (layer, module) -> stacks or None
    backend: str = "auto"
    groups: list | None = None  # kernels.dispatch.lora_plan, for the CPU path
    # The registry's layout_version when the step was planned: while it holds, `stacks` returns
    # the same tensors for every (layer, module). None: unknown (callers fetch them per step).
    layout: int | None = None

    def apply(self, layer: int, module: str, y: torch.Tensor, x: torch.Tensor) -> None:
        """y += per-row LoRA delta of `module` (in place; y may be a column slice)."""
        stacks = self.stacks(layer, module)
        if stacks is not None:
            dispatch.lora_apply(y, x, *stacks, self.indices, backend=self.backend, groups=self.groups)


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes, what each sequence attends to, and its adapter."""

    slot_mapping: torch.Tensor  # [num_tokens] int64 flat cache slot per new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with the null block
    seq_lens: torch.Tensor  # [num_seqs] int32 context length after this step
    query_start_locs: torch.Tensor  # [num_seqs + 1] int32
    kernel_backend: str = "auto"
    lora: LoRABatch | None = None  # None when no row of the step uses an adapter
    cpu_plan: Any = None  # kernels.paged_attention_cpu.CPUAttentionPlan, built once per step on CPU


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalizes in float32 as HF does, but scales before the one rounding to x's dtype
        # where HF rounds, scales and rounds again: in bf16 this is the closer one.
        return fused.rms_norm(x, self.weight, self.eps)[1]

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, its norm), or (x, norm(x)) without residual: one fused pass on CPU."""
        return fused.rms_norm(x, self.weight, self.eps, residual, backend=backend)


class Rotary(nn.Module):
    """RoPE with the model's (possibly scaled) inverse frequencies, cos/sin cached per position."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq = torch.tensor(config.inv_freq, dtype=torch.float32)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * config.rope_attention_scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * config.rope_attention_scaling, persistent=False)
        # rotate_half(x) * sin == roll(x, half) * signed_sin with the first half's sign flipped
        # (exact: a sign flip rounds nothing), which costs one op instead of four.
        half = emb.shape[-1] // 2
        sign = torch.cat((-torch.ones(half), torch.ones(half)))
        self.register_buffer("signed_sin", self.sin * sign, persistent=False)
        self._float_key: tuple | None = None
        self._float_tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def float_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed_sin in float32. The buffers follow the model's dtype (bf16 in a bf16
        model), so they are widened once per buffer, not every step (2 x 2 MB of copies for
        8192 positions)."""
        # Keyed on the buffer objects themselves (held, so no address can be reused): .to()
        # replaces them; nothing writes them in place.
        key = self._float_key
        if key is None or key[0] is not self.cos or key[1] is not self.signed_sin:
            self._float_tables = (self.cos.float(), self.signed_sin.float())
            self._float_key = (self.cos, self.signed_sin)
        return self._float_tables

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> fused.RopeStep:
        """The step's rotary inputs (positions and float32 tables), shared by every layer."""
        return fused.RopeStep(positions, *self.float_tables(), dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.wqkv = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.wo = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.sliding_window = config.sliding_windows[layer_idx]
        self.scale = self.head_dim ** -0.5
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, rope: fused.RopeStep,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """x may carry padding rows past the step's tokens (CausalLM.row_bucket): the
        projections run over them, rotary, the cache write and attention do not."""
        num_tokens = meta.slot_mapping.shape[0]
        padding = x.shape[0] - num_tokens
        qkv = self.wqkv(x)
        if padding:
            qkv = qkv[:num_tokens]
        if meta.lora is not None:
            q_end, k_end = self.q_size, self.q_size + self.kv_size
            meta.lora.apply(self.layer_idx, "q", qkv[:, :q_end], x)
            meta.lora.apply(self.layer_idx, "k", qkv[:, q_end:k_end], x)
            meta.lora.apply(self.layer_idx, "v", qkv[:, k_end:], x)
        k_cache, v_cache = kv_cache
        q = fused.rotary_and_cache(qkv, rope, self.num_heads, self.num_kv_heads, self.head_dim, k_cache, v_cache,
                                   meta.slot_mapping, backend=meta.kernel_backend, plan=meta.cpu_plan)
        o = dispatch.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                     meta.query_start_locs, self.scale, self.sliding_window,
                                     backend=meta.kernel_backend, plan=meta.cpu_plan)
        o = o.reshape(-1, self.q_size)
        out = self.wo(F.pad(o, (0, 0, 0, padding)) if padding else o)
        if meta.lora is not None:
            meta.lora.apply(self.layer_idx, "o", out, o)
        return out


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)  # gate | up
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.intermediate_size = config.intermediate_size
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None, backend: str = "auto") -> torch.Tensor:
        gate_up = self.w13(x)
        if lora is not None:
            lora.apply(self.layer_idx, "gate", gate_up[:, :self.intermediate_size], x)
            lora.apply(self.layer_idx, "up", gate_up[:, self.intermediate_size:], x)
        h = fused.silu_and_mul(gate_up, backend=backend)
        out = self.w2(h)
        if lora is not None:
            lora.apply(self.layer_idx, "down", out, h)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer_idx)

    def forward(self, residual: torch.Tensor, delta: torch.Tensor | None, rope: fused.RopeStep, kv_cache,
                meta: AttentionMetadata, taps: dict[int, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's input is residual + delta (delta: the previous layer's MLP output, None
        for layer 0), added inside the first norm; returns (h, mlp_out), whose sum is the
        layer's output. Deferring each add into the next norm makes add + norm one pass."""
        backend = meta.kernel_backend
        x, normed = self.attention_norm.add_forward(residual, delta, backend)
        h, ffn_input = self.ffn_norm.add_forward(x, self.attention(normed, rope, kv_cache, meta), backend)
        if taps is not None:
            taps[LAST_FFN_INPUT_TAP] = ffn_input
        return h, self.mlp(ffn_input, meta.lora, backend)


class CausalLM(nn.Module):
    """Embedding -> decoder layers -> final norm; `compute_logits` applies the LM head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = Rotary(config)
        # Rows of a step are padded up to a multiple of this (0: never) past ROW_BUCKET_FROM
        # tokens. Set where the linears are oneDNN's packed ones (server.models.linear), which
        # build a primitive per row count: a prefill step's row count is new almost every
        # time, and building wqkv's, wo's, w13's and w2's costs ~40 ms (2-core AMX Xeon),
        # ~10 % of a 12-prompt prefill step; padded counts repeat, and waste < 32 rows.
        self.row_bucket = 0
        # The C++ decoder stack (server.models.cpu_stack.CPUStack), set once the linears are final; it
        # runs the steps it takes, the layers below run the rest.
        self.cpu_stack = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                tap_layers: frozenset[int] = frozenset()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the decoder over a flat batch.

        Args:
            input_ids, positions: [num_tokens].
            tap_layers: layer indices whose output hidden states to return (layer i's
                output is the residual stream after layer i; FINAL_NORM_TAP = after the
                final norm; EMBED_TAP = the embedding output; LAST_FFN_INPUT_TAP = the last
                layer's normalised feed-forward input).
        Returns:
            hidden: [num_tokens, hidden] after the final norm; taps: layer -> [num_tokens, hidden].
        """
        num_tokens = input_ids.shape[0]
        padded = num_tokens
        if self.row_bucket and num_tokens > ROW_BUCKET_FROM and meta.lora is None:
            padded = -(-num_tokens // self.row_bucket) * self.row_bucket
        if self.cpu_stack is not None and self.cpu_stack.takes(meta, num_tokens, padded, tap_layers, kv_caches):
            hidden = self.cpu_stack.forward(self, input_ids, positions, kv_caches, meta)
            if hidden is not None:
                return hidden, {}
        h = self.embed(F.pad(input_ids, (0, padded - num_tokens)) if padded > num_tokens else input_ids)
        rope = self.rotary.tables(positions, h.dtype)
        taps: dict[int, torch.Tensor] = {}
        if EMBED_TAP in tap_layers:
            taps[EMBED_TAP] = h
        last = len(self.layers) - 1
        delta = None
        for i, layer in enumerate(self.layers):
            h, delta = layer(h, delta, rope, kv_caches[i], meta,
                             taps if i == last and LAST_FFN_INPUT_TAP in tap_layers else None)
            if i in tap_layers:
                taps[i] = h + delta
        _, h = self.norm.add_forward(h, delta, meta.kernel_backend)
        if FINAL_NORM_TAP in tap_layers:
            taps[FINAL_NORM_TAP] = h
        if padded > num_tokens:  # callers see the step's rows only
            return h[:num_tokens], {key: tap[:num_tokens] for key, tap in taps.items()}
        return h, taps

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the head may be packed or quantized: no .weight to read)."""
        return self.embed.weight.dtype

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        return logits if logits.dtype == torch.float64 else logits.float()  # float64: oracle tests
