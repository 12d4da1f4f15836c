"""A decode step's decoder layers in one C++ call on CPU (`DecoderStack`, kernels/csrc/decoder_cpu.cpp).

Owns: building the stack over a `CausalLM`'s own weights (shared, not copied) and deciding,
step by step, whether it may run the step. It runs the same kernels and linears in the same
order as `CausalLM`'s Python layers, so its output is bitwise theirs; what it removes is the
fixed cost around them (Python frames, argument parsing, per-op allocation and GIL hand-backs:
~5 ms of a ~20 ms decode step of the default model on a 2-core CPU, measured with a 30-layer
model too narrow to compute anything).

It takes a step when every row decodes one token (`CPUAttentionPlan.all_decode`) under the
"auto" kernel backend, with no LoRA rows, no taps asked and no padding rows; anything else (a
prefill chunk, an adapter, DoLa's taps, the "torch" oracle route, float32 or float64, CUDA,
quantized weights, a machine without the C++ kernels) keeps the Python layers.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kernels import cpu_ext
from server.models.linear import SMALL_M_MAX_ROWS, PackedLinear

STACK_DTYPES = (torch.bfloat16, torch.float16)  # where the decode attention kernel takes the cache


def _weights(linear: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, bool,
                                                              torch.Tensor] | None:
    """(weight, bias, packed, small-M weight or an empty tensor) of a projection the stack can
    call, else None."""
    if isinstance(linear, PackedLinear):
        return linear.packed, linear.bias, True, torch.empty(0) if linear.small is None else linear.small
    if type(linear) is nn.Linear and linear.weight.dtype == dtype:
        return linear.weight.detach(), None if linear.bias is None else linear.bias.detach(), False, torch.empty(0)
    return None


def build(model: nn.Module) -> Any | None:
    """The model's `DecoderStack`, or None where the stack cannot serve it."""
    dtype = model.dtype
    ext = cpu_ext.load() if dtype in STACK_DTYPES and model.embed.weight.is_cpu else None
    if ext is None:
        return None
    lists: dict[str, list] = {key: [] for key in ("attn_norm", "wqkv", "bias", "wo", "ffn_norm", "w13", "w2",
                                                  "window", "packed", "small")}
    for i, layer in enumerate(model.layers):
        projections = [_weights(m, dtype) for m in (layer.attention.wqkv, layer.attention.wo,
                                                    layer.mlp.w13, layer.mlp.w2)]
        if any(p is None for p in projections) or len({p[2] for p in projections}) != 1:
            return None
        if any(p[1] is not None for p in projections[1:]):
            return None  # only the qkv projection may carry a bias (Qwen2)
        (wqkv, bias, packed, _), (wo, *_), (w13, *_), (w2, *_) = projections
        lists["attn_norm"].append(layer.attention_norm.weight.detach())
        lists["ffn_norm"].append(layer.ffn_norm.weight.detach())
        for key, value in (("wqkv", wqkv), ("bias", bias), ("wo", wo), ("w13", w13), ("w2", w2),
                           ("window", layer.attention.sliding_window or 0), ("packed", packed),
                           ("small", [p[3] for p in projections])):
            lists[key].append(value)
    config = model.config
    return ext.DecoderStack(lists["attn_norm"], lists["wqkv"], lists["bias"], lists["wo"], lists["ffn_norm"],
                            lists["w13"], lists["w2"], lists["window"], lists["packed"], lists["small"],
                            SMALL_M_MAX_ROWS, model.norm.weight.detach(), config.num_heads, config.num_kv_heads,
                            config.head_dim, config.rms_norm_eps)


def takes(meta: Any, num_tokens: int, padded: int, tap_layers: frozenset[int],
          kv_caches: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> bool:
    """Whether the stack may run this step (see the module docstring)."""
    plan = meta.cpu_plan
    return (plan is not None and plan.all_decode and meta.lora is None and not tap_layers
            and meta.kernel_backend == "auto" and padded == num_tokens and kv_caches[0][0].dtype == dtype)


def forward(stack: Any, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
            kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: Any) -> torch.Tensor:
    """The step's hidden states after the final norm, [tokens, hidden]."""
    h = model.embed(input_ids)
    rotary = model.rotary
    plan = meta.cpu_plan
    return stack.forward(h, positions, rotary.cos.float(), rotary.signed_sin.float(), meta.slot_mapping,
                         [k for k, _ in kv_caches], [v for _, v in kv_caches], plan.decode_tables,
                         plan.decode_lens, model.layers[0].attention.scale)
