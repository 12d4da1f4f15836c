"""A decode step's decoder layers in one C++ call on CPU (`DecoderStack`, kernels/csrc/decoder_cpu.cpp).

Owns: building the stack over a `CausalLM`'s own weights (shared, not copied) and deciding,
step by step, whether it may run the step. It runs the same kernels and linears in the same
order as `CausalLM`'s Python layers, so its output is bitwise theirs; what it removes is the
fixed cost around them (Python frames, argument parsing, per-op allocation and GIL hand-backs:
~5 ms of a ~20 ms decode step of the default model on a 2-core CPU, seen ad hoc with a 30-layer
model too narrow to compute anything; what it buys is in bench/results/serve_ab_decode_stack_*
and step_profile_decode_stack_*).

It takes a step when every row decodes one token (`CPUAttentionPlan.all_decode`) under the
"auto" kernel backend, with no taps asked and no padding rows; adapter rows too, where
kernels.lora plans them for its C++ BGMV (then the stack calls that op per projection, as the
Python layers would). Anything else (a prefill chunk, DoLa's taps, the "torch" oracle route,
LoRA stacks on the torch route, float32 or float64, CUDA, quantized weights, a machine without
the C++ kernels) keeps the Python layers.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kernels import cpu_ext
from server.models.linear import PackedLinear

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


def build(model: nn.Module) -> CPUStack | None:
    """The model's stack, or None where the stack cannot serve it."""
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
    return CPUStack(ext.DecoderStack(lists["attn_norm"], lists["wqkv"], lists["bias"], lists["wo"],
                                     lists["ffn_norm"], lists["w13"], lists["w2"], lists["window"], lists["packed"],
                                     lists["small"], model.norm.weight.detach(), config.num_heads,
                                     config.num_kv_heads, config.head_dim, config.rms_norm_eps),
                    len(model.layers), dtype)


LORA_MODULES = ("q", "k", "v", "o", "gate", "up", "down")  # the order DecoderStack applies them in
LoRALists = tuple[list, list, list]  # per layer and LORA_MODULES entry: rank-major A, B, scales (or None)


class CPUStack:
    """The C++ `DecoderStack` and what it needs per step that can outlive a step."""

    def __init__(self, ext_stack: Any, num_layers: int, dtype: torch.dtype) -> None:
        self.ext = ext_stack
        self.num_layers = num_layers
        self.dtype = dtype
        # The adapter stacks' lists for one registry layout: ~210 lookups a step otherwise
        # (0.6 ms of a ~28 ms 16-row step with 16 adapters, 2-core AMX Xeon, ad hoc).
        self._lora_key: tuple[Any, int] | None = None
        self._lora_lists: LoRALists | None = None

    def takes(self, meta: Any, num_tokens: int, padded: int, tap_layers: frozenset[int],
              kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Whether the stack may run this step (see the module docstring)."""
        plan = meta.cpu_plan
        return (plan is not None and plan.all_decode and not tap_layers and meta.kernel_backend == "auto"
                and padded == num_tokens and kv_caches[0][0].dtype == self.dtype
                and (meta.lora is None or _gathered_group(meta.lora) is not None))

    def forward(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: Any) -> torch.Tensor | None:
        """The step's hidden states after the final norm, [tokens, hidden]; None where its adapter
        stacks are not the C++ route's (see _lora_inputs): the caller then runs the Python layers."""
        lora_lists: LoRALists = ([], [], [])
        slots = rows = torch.empty(0, dtype=torch.long)
        rank = 0
        if meta.lora is not None:
            group = _gathered_group(meta.lora)
            found = self._lora_inputs(meta.lora)
            if group is None or found is None:
                return None
            lora_lists, slots, rank = found, group.slots, group.rank
            rows = rows if group.rows is None else group.rows
        h = model.embed(input_ids)
        plan = meta.cpu_plan
        return self.ext.forward(h, positions, *model.rotary.float_tables(), meta.slot_mapping,
                                [k for k, _ in kv_caches], [v for _, v in kv_caches], plan.decode_tables,
                                plan.decode_lens, model.layers[0].attention.scale, *lora_lists, slots, rows, rank)

    def _lora_inputs(self, lora: Any) -> LoRALists | None:
        """_lora_inputs of the step's stacks, kept while the registry's layout holds."""
        if lora.layout is None:
            return _lora_inputs(lora, self.num_layers, self.dtype)
        key = (lora.stacks, lora.layout)
        if key != self._lora_key:
            self._lora_lists, self._lora_key = _lora_inputs(lora, self.num_layers, self.dtype), key
        return self._lora_lists


def _gathered_group(lora: Any) -> Any | None:
    """The step's one gathered LoRA group where kernels.lora plans the C++ route, else None."""
    groups = lora.groups
    if lora.backend != "auto" or groups is None or len(groups) != 1 or isinstance(groups[0].slots, int):
        return None
    return groups[0]


def _lora_inputs(lora: Any, num_layers: int, dtype: torch.dtype) -> LoRALists | None:
    """Per layer and module (LORA_MODULES) the stacks as lora_bgmv takes them (A rank-major),
    or None where some module's stacks would send kernels.lora.lora_grouped to its torch route:
    the stack then leaves the step to the Python layers, so their numerics stay one."""
    lists: LoRALists = ([], [], [])
    for layer in range(num_layers):
        for module in LORA_MODULES:
            stacks = lora.stacks(layer, module)
            if stacks is None:
                for out in lists:
                    out.append(None)
                continue
            lora_a, lora_b, scales = stacks
            rank_major = lora_a.transpose(1, 2)
            if not (rank_major.is_contiguous() and lora_b.is_contiguous() and lora_a.dtype in (torch.float32, dtype)
                    and lora_b.dtype == lora_a.dtype):
                return None
            for out, value in zip(lists, (rank_major, lora_b, scales)):
                out.append(value)
    return lists
