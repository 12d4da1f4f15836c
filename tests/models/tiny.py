"""Tiny random-weight HF checkpoints (with the default tokenizer) and a logits oracle for them."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from server.config import CacheConfig, EngineConfig, SchedulerConfig
from server.engine.engine import LLMEngine
from server.engine.kv_cache import NULL_BLOCK
from server.engine.sequence import SamplingParams


def save_tiny(model, model_dir: Path, out: Path) -> Path:
    """Save `model` (sharpened so argmax is stable) with the default model's tokenizer files."""
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.save_pretrained(out)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def tiny_engine(path: Path, block_size: int = 4, max_num_batched_tokens: int = 20) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu",
                                  cache=CacheConfig(block_size=block_size, num_kv_blocks=256),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                                            max_model_len=512)))


def check_against_hf(engine: LLMEngine, hf, prompt_len: int = 70, new_tokens: int = 30) -> list[int]:
    """Greedy-decode through our engine; every step's top-5 logprobs must equal HF's (teacher-forced).

    Returns the number of non-null KV blocks the sequence held before each step.
    """
    prompt = torch.randint(3, hf.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    engine.add_request("tiny", prompt, SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                                                      logprobs=5))
    tokens, logprobs, held = [], [], []
    while engine.has_unfinished:
        for seq in engine.scheduler.running:
            held.append(sum(1 for b in seq.block_table if b != NULL_BLOCK))
        for d in engine.step():
            tokens.extend(d.new_token_ids)
            logprobs.extend(d.logprobs)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + tokens])).logits[0].float(), dim=-1)
    assert len(logprobs) == new_tokens
    for step, lp in enumerate(logprobs):
        row = ref[prompt_len - 1 + step]
        for token_id, value in lp.top:
            assert abs(row[token_id].item() - value) < 1e-4, (step, token_id, row[token_id].item(), value)
        assert lp.token_id == int(row.argmax()) or float(row.topk(2).values.diff().abs()) < 1e-3
    return held
