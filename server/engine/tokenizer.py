"""Tokenizer front: chat template, incremental detokenizing, stop-string handling.

Detokenizing keeps prefix/read offsets and holds back text ending in an incomplete
UTF-8 character (U+FFFD), so a stream never splits a multi-byte character. The same
algorithm runs in Rust when the `tokenizers` backend has `DecodeStream` (one call per token
instead of two Python-side decodes); the Python version is the fallback.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """Thin wrapper over an HF fast tokenizer."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(model_dir))
        self.backend = getattr(self.hf, "backend_tokenizer", None)  # tokenizers.Tokenizer of a fast one
        self.eos_token_id: int | None = self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        if not self.hf.chat_template:
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        # NOTE: the template already writes any BOS it wants; adding specials would double it.
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        return self.hf.decode([token_id], skip_special_tokens=False)

    def decode_stream(self, context_ids: list[int], skip_special_tokens: bool) -> Any:
        """A `tokenizers` DecodeStream primed with `context_ids`, or None where its text could
        differ from `decode` (no fast backend, HF-side space clean-up) or it is unavailable."""
        if self.backend is None or getattr(self.hf, "clean_up_tokenization_spaces", False):
            return None
        try:
            from tokenizers.decoders import DecodeStream
        except ImportError:
            return None
        # NOTE: DecodeStream takes a context whose text ends in U+FFFD as "no context" and would
        # then emit that text; the Python algorithm skips it, so such a context stays in Python.
        if self.backend.decode(context_ids, skip_special_tokens=skip_special_tokens).endswith(REPLACEMENT_CHAR):
            return None
        return DecodeStream(ids=list(context_ids), skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas."""

    # Tokens decoded together before the new ones, so merges/spaces render as in a full decode.
    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True,
                 use_stream: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-self.CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._stream = tokenizer.decode_stream(self.ids, skip_special_tokens) if use_stream else None

    def fork(self) -> IncrementalDetokenizer:
        """An independent copy (the tokenizer is shared, read-only)."""
        child = copy.copy(self)
        child.ids = list(self.ids)
        child._stream = copy.copy(self._stream)  # NOTE: DecodeStream's copy is a deep one
        return child

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (maybe empty)."""
        self.ids.append(token_id)
        if self._stream is not None:
            try:
                delta = self._stream.step(self.tokenizer.backend, token_id)
            except Exception:  # e.g. a decoder whose text is not prefix-stable: go on in Python
                self._stream = None
            else:
                # NOTE: DecodeStream moves its offsets exactly as the Python path below does.
                if delta is None:
                    return ""
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                return delta
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        new_text = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""


def find_stop(text: str, stops: tuple[str, ...], search_from: int) -> int:
    """Index where the earliest stop string starts in text[search_from - overlap:], or -1."""
    best = -1
    for stop in stops:
        idx = text.find(stop, max(0, search_from - len(stop) + 1))
        if idx != -1 and (best == -1 or idx < best):
            best = idx
    return best


def held_back_chars(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing chars could start a stop string, so must not be streamed yet."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold
