"""Read and validate a PEFT LoRA directory against the base model's shapes.

In: a directory with `adapter_config.json` + `adapter_model.safetensors` (or `.bin`) and an
optional `alignserve.json` (written by adapters/train). Out: `LoRAWeights`, float32 CPU tensors
keyed by (layer, module) with A as [in, rank] and B as [rank, out], ready to be stacked into
device slots by `adapters.registry`. Every way an adapter can fail to fit raises `AdapterError`
(HTTP 400, 403 outside the adapter root) naming what is wrong, with paths relative to the root.
Files are read through adapters/adapter_files.py (confined to the root) and typed by
adapters/peft_schema.py; this module decides what is servable. It does no device work and keeps no
state; it is called off the engine thread because it reads from disk.
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapters.adapter_files import AdapterDir, open_adapter_dir
from adapters.errors import AdapterError, bad_adapter
from adapters.peft_schema import AdapterMetadata, LoraAdapterConfig, PeftHeader, parse, pattern_regex
from adapters.train.common import METADATA_FILE, ROLE_TASK_TYPES
from server.models.config import ModelConfig

__all__ = ["MODULES", "AdapterError", "LoRAWeights", "load_peft_adapter", "module_shape"]

MODULES = ("q", "k", "v", "o", "gate", "up", "down")
# HF projection name -> (parent block, our module name)
_HF_MODULES = {"q_proj": ("self_attn", "q"), "k_proj": ("self_attn", "k"), "v_proj": ("self_attn", "v"),
               "o_proj": ("self_attn", "o"), "gate_proj": ("mlp", "gate"), "up_proj": ("mlp", "up"),
               "down_proj": ("mlp", "down")}
_UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head")
# e.g. "model.layers.3.self_attn.q_proj.lora_A.weight" once the "base_model.model." prefix is gone;
# an adapter-name segment ("lora_A.default.weight") is tolerated.
_LORA_KEY = re.compile(r"^(?P<module_path>(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>\w+)\.(?P<proj>\w+))"
                       r"\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")
_PEFT_PREFIX = "base_model.model."
# Config switches that change the forward pass beyond y += s * x A B; serving them plainly would be wrong.
_UNSUPPORTED_FLAGS = {"use_dora": "DoRA (use_dora)", "lora_bias": "LoRA bias (lora_bias)",
                      "layer_replication": "layer_replication", "target_parameters": "target_parameters",
                      "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
                      "trainable_token_indices": "trainable_token_indices", "use_qalora": "QALoRA (use_qalora)"}
_TASK_ROLES = {None: "sft", "CAUSAL_LM": "sft", "SEQ_CLS": "rm"}
_MAX_JSON_BYTES = 16 << 20  # adapter_config.json is ~1 KB; alignserve.json holds a loss history


@dataclass
class LoRAWeights:
    """One adapter on the host, validated against a base model.

    NOTE: `weights[(layer, module)] = (A, B)` with A [in_features, r] and B [r, out_features]
    (PEFT's lora_A.weight / lora_B.weight transposed), so delta = scaling * (x @ A) @ B.
    """

    name: str
    path: Path
    rank: int  # largest module rank (rank_pattern may give modules smaller ranks)
    scaling: float  # lora_alpha / r (or / sqrt(r) with rsLoRA)
    role: str  # sft | dpo | rm | arm
    target_modules: tuple[str, ...]  # subset of MODULES, in MODULES order
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. "score.weight" [1, hidden]
    metadata: dict[str, Any] = field(default_factory=dict)  # alignserve.json, or {}
    # Modules whose rank_pattern/alpha_pattern entry gives a scaling other than `scaling`.
    module_scaling: dict[tuple[int, str], float] = field(default_factory=dict)
    # `path` as clients may see it: relative to the adapter root; "" for operator-given adapters
    # (`--lora-modules`, no root), whose server paths clients are not shown.
    display_path: str = ""

    def scaling_of(self, layer: int, module: str) -> float:
        """The scaling applied to (layer, module)'s delta."""
        return self.module_scaling.get((layer, module), self.scaling)


def module_shape(config: ModelConfig, module: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection of the base model."""
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {"q": (config.hidden_size, q_size), "k": (config.hidden_size, kv_size),
            "v": (config.hidden_size, kv_size), "o": (q_size, config.hidden_size),
            "gate": (config.hidden_size, config.intermediate_size),
            "up": (config.hidden_size, config.intermediate_size),
            "down": (config.intermediate_size, config.hidden_size)}[module]


def load_peft_adapter(path: str | Path, model_config: ModelConfig, max_rank: int = 64,
                      name: str | None = None, root: Path | None = None) -> LoRAWeights:
    """Read a PEFT LoRA directory and check it fits `model_config`.

    Args:
        path: the adapter directory (relative paths are taken from `root` when one is given).
        model_config: the served base model.
        max_rank: `--max-lora-rank`; larger adapters are refused.
        name: the served name; defaults to the directory name.
        root: `--adapter-root`: the directory and every file read must resolve inside it.
            None for operator-given paths (`--lora-modules`), which are trusted.
    Raises:
        AdapterError: status 400 (403 outside `root`), param "lora_path", naming what is wrong.
    """
    adapter = open_adapter_dir(path, root)
    where = adapter.shown
    raw_config = _read_json(adapter, "adapter_config.json", required=True)
    peft_type = parse(PeftHeader, raw_config, adapter.show("adapter_config.json")).peft_type.upper()
    if peft_type != "LORA":
        raise bad_adapter(f"{where}: unsupported adapter type {peft_type}; only LoRA")
    config = parse(LoraAdapterConfig, raw_config, adapter.show("adapter_config.json"))
    metadata = _read_json(adapter, METADATA_FILE, required=False)
    meta = parse(AdapterMetadata, metadata, adapter.show(METADATA_FILE))
    _check_config(adapter, config)
    role = _role(adapter, config, meta)
    _check_fingerprint(where, meta, model_config)
    tensors = _read_tensors(adapter)

    r, alpha = config.r, config.lora_alpha
    rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    module_paths: dict[tuple[int, str], str] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key.removeprefix(_PEFT_PREFIX))
        if match is None:
            extra_key = _extra_key(where, key)
            extra[extra_key] = tensor.detach().to("cpu", torch.float32).contiguous()
            continue
        layer, block, proj = int(match["layer"]), match["block"], match["proj"]
        if _HF_MODULES.get(proj, (None,))[0] != block:
            raise bad_adapter(f"{where}: LoRA on layers.{layer}.{block}.{proj} ({key}) is not supported; "
                              f"only {', '.join(_HF_MODULES)}")
        if layer >= model_config.num_layers:
            raise bad_adapter(f"{where}: tensor {key} is for layer {layer}, but the base model has "
                              f"{model_config.num_layers} layers (0..{model_config.num_layers - 1})")
        target = (layer, _HF_MODULES[proj][1])
        pairs.setdefault(target, {})[match["ab"]] = tensor
        module_paths[target] = match["module_path"]
    if not pairs:
        raise bad_adapter(f"{where}: no LoRA tensors (lora_A/lora_B) in the adapter weights")

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    module_scaling: dict[tuple[int, str], float] = {}
    use_rslora = bool(config.use_rslora)
    scaling = _scaling(alpha, r, use_rslora)
    for target in sorted(pairs, key=lambda t: (t[0], MODULES.index(t[1]))):
        ab = pairs[target]
        layer, module = target
        label = f"layers.{layer} {module}"
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise bad_adapter(f"{where}: {label} has no {missing} tensor (lora_A and lora_B must come in pairs)")
        module_r = rank_pattern.get(_pattern_key(rank_pattern, module_paths[target]), r)
        if module_r > max_rank:
            raise bad_adapter(f"{where}: rank {module_r} exceeds --max-lora-rank {max_rank}")
        in_f, out_f = module_shape(model_config, module)
        for ab_name, expected in (("A", [module_r, in_f]), ("B", [out_f, module_r])):
            got = list(ab[ab_name].shape)
            if got != expected:
                raise bad_adapter(f"{where}: {module_paths[target]}.lora_{ab_name}.weight has shape {got}; "
                                  f"expected {expected} (rank {module_r}, base {module} projection "
                                  f"{in_f} -> {out_f})")
        # PEFT stores lora_A [r, in] and lora_B [out, r]; the kernel wants A [in, r], B [r, out].
        weights[target] = (ab["A"].detach().to("cpu", torch.float32).t().contiguous(),
                           ab["B"].detach().to("cpu", torch.float32).t().contiguous())
        module_alpha = alpha_pattern.get(_pattern_key(alpha_pattern, module_paths[target]), alpha)
        if (module_r, module_alpha) != (r, alpha):
            module_scaling[target] = _scaling(module_alpha, module_r, use_rslora)

    _check_extra(where, extra, role, model_config)
    present = {module for _, module in weights}
    return LoRAWeights(
        name=name or Path(path).name or adapter.path.name, path=adapter.path,
        rank=max(a.shape[1] for a, _ in weights.values()), scaling=scaling, role=role,
        target_modules=tuple(m for m in MODULES if m in present), weights=weights, extra=extra,
        metadata=metadata, module_scaling=module_scaling, display_path=where if root is not None else "")


def _scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def _read_json(adapter: AdapterDir, name: str, required: bool) -> dict[str, Any]:
    data = adapter.read(name, max_bytes=_MAX_JSON_BYTES)
    if data is None:
        if required:
            raise bad_adapter(f"{adapter.shown}: missing {name} (not a PEFT adapter directory)")
        return {}
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a 5,000-digit int, deep nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise bad_adapter(f"{adapter.show(name)}: cannot parse ({reason})") from None
    if not isinstance(parsed, dict):
        raise bad_adapter(f"{adapter.show(name)}: expected a JSON object, got {type(parsed).__name__}")
    return parsed


def _check_config(adapter: AdapterDir, config: LoraAdapterConfig) -> None:
    """Reject LoRA variants the batched kernel cannot reproduce (types are already checked)."""
    where = adapter.show("adapter_config.json")
    for flag, label in _UNSUPPORTED_FLAGS.items():
        if getattr(config, flag, None):  # extras of the schema: any truthy value switches them on
            raise bad_adapter(f"{where}: {label} is not supported; only plain LoRA")
    init = config.init_lora_weights
    # These inits rewrite the base weights too; the adapter only fits that modified base.
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        raise bad_adapter(f"{where}: init_lora_weights {init!r} changes the base weights; convert it to plain "
                          "LoRA first (PEFT save_pretrained(path_initial_model_for_weight_conversion=...))")
    if config.bias != "none":
        raise bad_adapter(f"{where}: bias {config.bias!r} is not supported; only bias \"none\"")
    targets = config.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        named = [t for t in ("model.embed_tokens", "lm_head") if re.fullmatch(targets, t)]
    else:
        named = [t for t in (targets or []) if t.split(".")[-1] in _UNSUPPORTED_TARGETS]
    if named:
        raise bad_adapter(f"{where}: LoRA on {', '.join(named)} is not supported; only the "
                          f"{'/'.join(_HF_MODULES)} projections")


def _role(adapter: AdapterDir, config: LoraAdapterConfig, meta: AdapterMetadata) -> str:
    task_type = config.task_type
    if task_type not in _TASK_ROLES:
        raise bad_adapter(f"{adapter.shown}: task_type {task_type!r} is not supported; expected CAUSAL_LM or SEQ_CLS")
    role = meta.role or _TASK_ROLES[task_type]  # the schema has checked it is a known role
    if task_type is not None and ROLE_TASK_TYPES[role] != task_type:
        raise bad_adapter(f"{adapter.shown}: role {role!r} needs task_type {ROLE_TASK_TYPES[role]}, got {task_type}")
    return role


def _check_fingerprint(where: str, meta: AdapterMetadata, config: ModelConfig) -> None:
    """Refuse adapters whose recorded base differs from ours even where tensor shapes agree."""
    recorded = meta.base_fingerprint or {}
    ours = {"model_type": config.model_type, "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads, "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size}
    diff = [f"{k} {recorded[k]} != {ours[k]}" for k in ours if recorded.get(k) is not None
            and recorded[k] != ours[k]]
    if diff:
        raise bad_adapter(f"{where}: trained on a different base model ({', '.join(diff)})")


def _read_tensors(adapter: AdapterDir) -> dict[str, torch.Tensor]:
    # NOTE: parsed from bytes read through `adapter`, never reopened by path, so the file that was
    # checked to lie inside the adapter root is the file that is parsed.
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        data = adapter.read(name)
        if data is None:
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load
                return load(data)
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError("not a dict of tensors")
            return state
        except Exception as exc:  # safetensors/pickle raise many types; all mean "unreadable file"
            reason = f"{type(exc).__name__}: {exc}"[:300]
            raise bad_adapter(f"{adapter.show(name)}: cannot read adapter weights ({reason})") from None
    raise bad_adapter(f"{adapter.shown}: missing adapter_model.safetensors (or adapter_model.bin)")


def _extra_key(where: str, key: str) -> str:
    """Name of a non-LoRA tensor; only the RM `score` head (modules_to_save) is servable."""
    short = key.removeprefix(_PEFT_PREFIX)
    # PEFT also saves `<module>.base_layer.weight` for LoRA-wrapped embeddings and heads.
    if "lora_" in short or ".base_layer." in short:
        target = next((t for t in _UNSUPPORTED_TARGETS if t in short), None)
        if target is not None:
            raise bad_adapter(f"{where}: LoRA on {target} is not supported ({key}); only the "
                              f"{'/'.join(_HF_MODULES)} projections")
        raise bad_adapter(f"{where}: unrecognised LoRA tensor {key}")
    if short.split(".")[0] != "score":
        raise bad_adapter(f"{where}: tensor {key} replaces base weights (modules_to_save); only LoRA deltas "
                          "and an RM 'score' head are supported")
    return short


def _check_extra(where: str, extra: dict[str, torch.Tensor], role: str, config: ModelConfig) -> None:
    score = extra.get("score.weight")
    if score is not None and (score.dim() != 2 or score.shape[1] != config.hidden_size):
        raise bad_adapter(f"{where}: score.weight has shape {list(score.shape)}; expected "
                          f"[num_labels, {config.hidden_size}]")
    if role == "rm" and score is None:
        raise bad_adapter(f"{where}: reward-model adapter has no score.weight "
                          "(save it with modules_to_save=['score'])")


def _pattern_key(patterns: dict[str, Any], module_path: str) -> str:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first pattern matching a suffix of the path."""
    for pattern in patterns:
        if pattern_regex(pattern).match(module_path):
            return pattern
    return module_path
