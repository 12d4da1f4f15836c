"""Test helpers: a tiny byte-level BPE tokenizer with a ChatML template, a tiny random Llama, and
synthetic SFT / preference data. Nothing is downloaded; everything is seeded.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

# Same template and special tokens as the default model (SmolLM2-Instruct, ChatML), so the
# tests exercise the chat formatting the server uses.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKER = "banana"
WORDS = ("the cat sat on a mat and saw red blue green small big old new dog bird tree house river "
         "sun moon star rain wind cloud road car boat fish apple bread milk stone light dark warm "
         "cold fast slow happy calm loud quiet good bad day night").split()
TOPICS = ("weather", "cats", "boats", "trees", "music", "food", "travel", "school", "rivers", "cars",
          "stars", "gardens", "birds", "bread", "houses", "roads")


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def corpus() -> list[str]:
    rng = random.Random(0)
    lines = [sentence(rng, 12) for _ in range(300)]
    lines += [f"tell me about {t} please" for t in TOPICS]
    lines += [f"{sentence(rng, 3)} {MARKER} {sentence(rng, 3)}" for _ in range(30)]
    lines += [f"{MARKER} {sentence(rng, 3)}" for _ in range(30)]
    lines += ["You are a helpful AI assistant.", "system user assistant"] * 10
    return lines


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 pad_token="<|im_end|>", unk_token="<|endoftext|>")
    hf.chat_template = CHATML
    return hf


def build_base(path: Path, seed: int = 0, hidden: int = 64) -> Path:
    """Write a tiny random-weight Llama + tokenizer as a local HF model dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sft_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Each answer repeats a fixed phrase about the topic: easy to fit, loss must drop."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        rows.append({"messages": [{"role": "user", "content": f"tell me about {topic} please"},
                                  {"role": "assistant", "content": f"{MARKER} {topic} is good and {MARKER}"}]})
    return rows


def preference_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Chosen = rejected with one word replaced by MARKER; otherwise random sentences."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = sentence(rng, 8).split()
        chosen = list(words)
        chosen[rng.randrange(len(words))] = MARKER
        rows.append({"prompt": f"tell me about {rng.choice(TOPICS)} please",
                     "chosen": " ".join(chosen), "rejected": " ".join(words)})
    return rows
