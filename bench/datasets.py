"""Prompt sets for the load tool: seeded synthetic prompts, multi-turn chats, and JSONL files.

In: a `PromptConfig`, a request count and a `TokenCounter`.
Out: a list of `Session`s; each session is one or more `Turn`s sent in order, where a later turn
sees the earlier turns plus the server's replies (the runner appends those; see `bench.load`).
Does not: send requests or download anything; multi-turn filler text is generated locally.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from bench.config import PromptConfig
from bench.tokens import TokenCounter

Message = dict[str, str]


@dataclass(frozen=True)
class Turn:
    """One request's new messages.

    `fallback_reply` stands in for the assistant's reply in the history when the server's reply
    is empty or failed, so a conversation always goes on.
    """

    messages: tuple[Message, ...]
    max_tokens: int
    input_len: int  # estimated tokens of `messages` (not of the history before it)
    fallback_reply: str = ""


@dataclass(frozen=True)
class Session:
    """A conversation: its turns run one after another; a single-turn session is one request."""

    turns: tuple[Turn, ...]


def build_workload(cfg: PromptConfig, num_requests: int, counter: TokenCounter) -> list[Session]:
    """Sessions holding exactly `num_requests` turns in all, seeded by `cfg.seed`."""
    rng = random.Random(cfg.seed)
    if cfg.dataset is not None:
        turns = load_jsonl(cfg.dataset, cfg, counter)
        # NOTE: a dataset smaller than the run is cycled, each pass in a fresh seeded order.
        picked: list[Turn] = []
        while len(picked) < num_requests:
            order = list(range(len(turns)))
            rng.shuffle(order)
            picked.extend(turns[i] for i in order[: num_requests - len(picked)])
        return [Session((t,)) for t in picked]
    if cfg.prompt_set == "multiturn":
        return multiturn_sessions(cfg, num_requests, counter, rng)
    return [Session((synthetic_turn(cfg, counter, rng),)) for _ in range(num_requests)]


def _max_tokens(cfg: PromptConfig, rng: random.Random, own: int | None = None) -> int:
    if cfg.max_tokens is not None:
        return cfg.max_tokens
    return own if own is not None else cfg.output_len.sample(rng)


def synthetic_turn(cfg: PromptConfig, counter: TokenCounter, rng: random.Random) -> Turn:
    """One user message of random common words with a sampled token length.

    NOTE: the length is that of the message content; a chat template adds a few tokens.
    """
    text, n = counter.make_text(rng, cfg.input_len.sample(rng))
    return Turn(({"role": "user", "content": text},), _max_tokens(cfg, rng), n)


def load_jsonl(path: Path, cfg: PromptConfig, counter: TokenCounter) -> list[Turn]:
    """Read lines of `{"prompt": str}` or `{"messages": [...]}`, each with optional max_tokens.

    Raises:
        ValueError: on an unreadable line, naming the file and line number.
    """
    rng = random.Random(cfg.seed)
    turns: list[Turn] = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if "messages" in row:
                messages = tuple({"role": str(m["role"]), "content": str(m["content"])}
                                 for m in row["messages"])
                if not messages:
                    raise ValueError("empty messages")
            elif isinstance(row.get("prompt"), str):
                messages = ({"role": "user", "content": row["prompt"]},)
            else:
                raise ValueError('need "prompt" (string) or "messages" (list)')
            own = row.get("max_tokens")
            if own is not None and (not isinstance(own, int) or own < 1):
                raise ValueError("max_tokens must be a positive integer")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from exc
        size = sum(counter.count(m["content"]) for m in messages)
        turns.append(Turn(messages, _max_tokens(cfg, rng, own), size))
    if not turns:
        raise ValueError(f"{path}: no prompts")
    return turns


# Filler for multi-turn chats: templated sentences over a few topics read like a real exchange
# and keep the text varied without any download.
_TOPICS = ("paged attention", "a sourdough starter", "solar panels", "the French revolution",
           "garden soil", "binary search", "marathon training", "coral reefs", "tax returns",
           "jazz harmony", "bicycle gears", "vaccines", "rust borrowing", "volcanoes")
_QUESTIONS = ("Can you explain how {t} works?", "What should a beginner know about {t}?",
              "Why does {t} matter so much?", "What is a common mistake with {t}?",
              "How would you compare {t} with the alternatives?", "Can you give an example?",
              "Could you go into more detail on that last point?", "How do I get started?")
_SUBJECTS = ("The key idea", "Most people", "A good rule of thumb", "In practice this",
             "The first step", "One detail that helps", "An expert", "The simplest approach")
_VERBS = ("depends on", "starts with", "comes down to", "is limited by", "builds on",
          "works best with", "changes with", "is easier with")
_OBJECTS = ("careful planning", "a small experiment", "the right tools", "steady practice",
            "a clear goal", "the details of {t}", "what you measure", "patience and feedback")
_TAILS = ("over time.", "in most cases.", "when you start out.", "for most people.",
          "once you see the pattern.", "if you keep notes.", "more than you might expect.")


def filler_sentence(rng: random.Random, topic: str) -> str:
    """One plausible declarative sentence about `topic`."""
    obj = rng.choice(_OBJECTS).format(t=topic)
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {obj} {rng.choice(_TAILS)}"


def filler_text(rng: random.Random, topic: str, num_tokens: int, counter: TokenCounter,
                lead: str = "") -> str:
    """`lead` followed by filler sentences until about `num_tokens` tokens."""
    parts = [lead] if lead else []
    size = counter.count(lead) if lead else 0
    while size < num_tokens:
        sentence = filler_sentence(rng, topic)
        parts.append(sentence)
        size += counter.count(sentence) + 1
    return " ".join(parts)


def multiturn_sessions(cfg: PromptConfig, num_requests: int, counter: TokenCounter,
                       rng: random.Random) -> list[Session]:
    """Conversations of `cfg.num_turns` user turns (the last one cut short to hit the count).

    Each user turn is a question plus context sentences of a sampled `input_len`; each turn's
    fallback reply is filler of a sampled `output_len`.
    """
    sessions: list[Session] = []
    left = num_requests
    while left > 0:
        topic = rng.choice(_TOPICS)
        turns: list[Turn] = []
        for _ in range(min(cfg.num_turns, left)):
            question = rng.choice(_QUESTIONS).format(t=topic)
            content = filler_text(rng, topic, cfg.input_len.sample(rng), counter, lead=question)
            reply = filler_text(rng, topic, cfg.output_len.sample(rng), counter)
            turns.append(Turn(({"role": "user", "content": content},), _max_tokens(cfg, rng),
                              counter.count(content), reply))
        sessions.append(Session(tuple(turns)))
        left -= len(turns)
    return sessions


def render_prompt(messages: list[Message]) -> str:
    """Messages as one completion prompt: a lone user message is sent verbatim, else a transcript."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"
