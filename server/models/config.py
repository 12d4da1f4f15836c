"""Model architecture config read from an HF config.json (Llama / Mistral / Qwen2 family)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a decoder-only model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    inv_freq: tuple[float, ...]  # RoPE inverse frequencies incl. the model's scaling
    rope_attention_scaling: float
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def max_sliding_window(self) -> int | None:
        """The window bounding KV memory, or None if any layer attends to everything."""
        if any(w is None for w in self.sliding_windows):
            return None
        return max(self.sliding_windows)  # type: ignore[type-var]

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(str(model_dir))
        return cls.from_hf(hf)

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":  # hf: transformers.PretrainedConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if hf.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {hf.model_type!r} not supported; expected one of {SUPPORTED_MODEL_TYPES}")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            attention_scaling = 1.0
        else:
            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
        windows = _sliding_windows(hf)
        eos = hf.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        bias = bool(getattr(hf, "attention_bias", hf.model_type == "qwen2"))
        return cls(
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bias,
            sliding_windows=windows,
            inv_freq=tuple(inv_freq.tolist()),
            rope_attention_scaling=float(attention_scaling),
            bos_token_id=hf.bos_token_id,
            eos_token_ids=eos_ids,
        )


def _sliding_windows(hf) -> tuple[int | None, ...]:
    """Per-layer window, following each family's config conventions."""
    n = hf.num_hidden_layers
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if window is None:
        return (None,) * n
    if hf.model_type == "qwen2":
        if not getattr(hf, "use_sliding_window", False):
            return (None,) * n
        first_full = getattr(hf, "max_window_layers", n)
        return tuple(None if i >= first_full else window for i in range(n))
    return (window,) * n
