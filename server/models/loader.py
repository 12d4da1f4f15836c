"""Load HF safetensors weights into our decoder (fusing q/k/v and gate/up projections)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from server.models.config import ModelConfig
from server.models.llama import CausalLM

# HF name suffix -> (our module path suffix, shard index within a fused weight)
_LAYER_MAP = {
    "self_attn.q_proj": ("attention.wqkv", 0),
    "self_attn.k_proj": ("attention.wqkv", 1),
    "self_attn.v_proj": ("attention.wqkv", 2),
    "self_attn.o_proj": ("attention.wo", None),
    "mlp.gate_proj": ("mlp.w13", 0),
    "mlp.up_proj": ("mlp.w13", 1),
    "mlp.down_proj": ("mlp.w2", None),
    "input_layernorm": ("attention_norm", None),
    "post_attention_layernorm": ("ffn_norm", None),
}


def _iter_tensors(model_dir: Path):
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """Build the decoder for `model_dir` and fill it with the checkpoint's weights."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.rotary = type(model.rotary)(config).to(device)  # buffers were on meta: rebuild
    params = dict(model.named_parameters(remove_duplicate=False))
    shards: dict[str, dict[int, torch.Tensor]] = {}
    loaded: set[str] = set()

    def put(name: str, tensor: torch.Tensor) -> None:
        params[name].data.copy_(tensor.to(dtype))
        loaded.add(name)

    for name, tensor in _iter_tensors(model_dir):
        if name == "model.embed_tokens.weight":
            put("embed.weight", tensor)
        elif name == "model.norm.weight":
            put("norm.weight", tensor)
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                put("lm_head.weight", tensor)
        elif name.startswith("model.layers."):
            _, _, idx, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)  # kind: weight | bias
            if module not in _LAYER_MAP:
                if "rotary_emb" in module:
                    continue
                raise ValueError(f"unexpected weight {name}")
            target, shard = _LAYER_MAP[module]
            full = f"layers.{idx}.{target}.{kind}"
            if shard is None:
                put(full, tensor)
            else:
                shards.setdefault(full, {})[shard] = tensor
    for full, parts in shards.items():
        put(full, torch.cat([parts[i] for i in sorted(parts)], dim=0))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
        loaded.add("lm_head.weight")
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks weights: {sorted(missing)[:5]}")
    return model.eval()
