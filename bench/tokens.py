"""Token counting for the load tool: a real HF tokenizer when given, else a word approximation.

In: text. Out: token counts, and texts of a chosen token length for synthetic prompts.
Used for (a) counting when a server omits `usage`, (b) splitting multi-token chunks for ITL,
(c) building prompts of controlled length. Does not talk to servers.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Protocol

# Short, common English words: in BPE vocabularies each is one token with its leading space,
# so without a tokenizer "N words" is a fair stand-in for "N tokens".
WORDS: tuple[str, ...] = tuple("""
the of and to in is was for on are with as his they be at one have this from or had by word
but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see
him two has look more day could go come did number sound no most people my over know water than
call first who may down side been now find any new work part take get place made live where after
back little only round man year came show every good me give our under name very through just form
sentence great think say help low line differ turn cause much mean before move right boy old too
same tell does set three want air well also play small end put home read hand port large spell add
even land here must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father head stand own page
should country found answer school grow study still learn plant cover food sun four between state
keep eye never last let thought city tree cross farm hard start might story saw far sea draw left
late run while press close night real life few north open seem together next white children begin
got walk example ease paper group always music those both mark often letter until mile river car
feet care second book carry took science eat room friend began idea fish mountain stop once base
""".split())

_WORDISH = re.compile(r"\w+|[^\w\s]")


class TextTokenizer(Protocol):
    """The two calls the tool needs from a tokenizer."""

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class _FastTokenizer:
    """`tokenizers.Tokenizer` from a tokenizer.json: loads in milliseconds, no transformers."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


class _HFTokenizer:
    """transformers AutoTokenizer, for tokenizer dirs without a tokenizer.json."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


class TokenCounter:
    """Counts tokens and builds texts of a target length; exact with a tokenizer, else approximate."""

    def __init__(self, tokenizer: TextTokenizer | None = None) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path: Path | None) -> TokenCounter:
        """A counter for the HF tokenizer at `path` (a dir or a tokenizer.json); None → words."""
        if path is None:
            return cls(None)
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if file.is_file() and file.suffix == ".json":
            return cls(_FastTokenizer(file))
        return cls(_HFTokenizer(path))

    @property
    def is_exact(self) -> bool:
        """True when counts come from a real tokenizer."""
        return self.tokenizer is not None

    def count(self, text: str) -> int:
        """Number of tokens in `text` (words + punctuation marks when approximating)."""
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text))
        return len(_WORDISH.findall(text))

    def make_text(self, rng: random.Random, num_tokens: int) -> tuple[str, int]:
        """Random common words of about `num_tokens` tokens; returns (text, its token count).

        With a tokenizer the count is exact after re-encoding (a decode/encode round trip can
        merge tokens, so we trim or pad a few times until it fits).
        """
        words = [rng.choice(WORDS) for _ in range(num_tokens)]
        text = " ".join(words)
        if self.tokenizer is None:
            return text, num_tokens
        tok = self.tokenizer
        ids = tok.encode(text)
        while len(ids) < num_tokens:  # rare: a tokenizer that merges across words
            ids = tok.encode(tok.decode(ids) + " " + " ".join(rng.choice(WORDS) for _ in range(8)))
        for _ in range(8):
            text = tok.decode(ids[:num_tokens])
            ids = tok.encode(text)
            if len(ids) == num_tokens:
                break
            if len(ids) < num_tokens:
                ids = tok.encode(text + " " + rng.choice(WORDS))
        return text, len(tok.encode(text))
