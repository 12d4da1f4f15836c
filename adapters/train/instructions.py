"""Verifiable instruction-following prompts: task templates x topics x constraints, seeded.

In: a seed and sizes. Out: `InstructionRecord`s (prompt text, constraint ids + args, the task
template it came from) split into train / held-out. The split is by *task template*, so held-out
prompts ask for kinds of text never seen in training while reusing the same constraint types:
the held-out pass rate measures whether the constraint-following generalises, not memorisation.
Checking responses is `constraints.py`'s job.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from adapters.train.constraints import CONSTRAINTS, compatible, describe

TASKS: tuple[tuple[str, str], ...] = (
    ("story", "Write a short story about {topic}."),
    ("poem", "Write a poem about {topic}."),
    ("explain_child", "Explain {topic} to a ten-year-old."),
    ("email", "Write an email to a friend about {topic}."),
    ("ad", "Write an advertisement for a product related to {topic}."),
    ("blog", "Write a blog post about {topic}."),
    ("tips", "Give some advice to a beginner interested in {topic}."),
    ("summary", "Summarize what most people should know about {topic}."),
    ("letter", "Write a letter to a city council about {topic}."),
    ("review", "Write a review of a book about {topic}."),
    ("pitch", "Pitch a startup idea related to {topic}."),
    ("dialogue", "Write a short conversation between two people discussing {topic}."),
    ("speech", "Write a short speech for a school assembly about {topic}."),
    ("riddle", "Write a riddle whose answer is related to {topic}."),
    ("pros_cons", "Discuss the pros and cons of {topic}."),
    ("history", "Describe how {topic} has changed over the last hundred years."),
    ("plan", "Outline a weekend plan centred on {topic}."),
    ("news", "Write a short news report about a recent event involving {topic}."),
    ("recipe_like", "Describe {topic} as if it were a cooking recipe."),
    ("diary", "Write a diary entry of someone who just discovered {topic}."),
    ("song", "Write song lyrics about {topic}."),
    ("faq", "Answer the question: why does {topic} matter?"),
    ("compare", "Compare {topic} with something from everyday life."),
    ("slogan", "Propose a slogan and a short rationale for a campaign about {topic}."),
)

# NOTE: topics avoid the excludable letters (z, q, x) so `letters:exclude` stays satisfiable.
TOPICS: tuple[str, ...] = (
    "the moon", "coffee", "rainy days", "public libraries", "electric cars", "honeybees",
    "learning to swim", "city parks", "old maps", "volcanoes", "board games", "bicycles",
    "the ocean tides", "friendship", "sleep", "the internet", "gardening", "trains", "recycling",
    "a lost umbrella", "the first day of school", "clouds", "museums", "street food",
    "homework", "wind power", "penguins", "a broken clock", "mountain hiking", "the color blue",
)


@dataclass(frozen=True)
class InstructionRecord:
    """One prompt with its machine-checkable constraints."""

    id: str
    prompt: str
    constraints: tuple[dict[str, Any], ...]
    template: str
    topic: str
    split: str

    def to_json(self) -> dict[str, Any]:
        """A plain dict for JSONL (constraints as a list)."""
        row = asdict(self)
        row["constraints"] = list(self.constraints)
        return row


def sample_constraints(rng: random.Random, k: int) -> list[dict[str, Any]]:
    """Draw `k` mutually compatible constraints with sampled arguments."""
    ids: list[str] = []
    candidates = sorted(CONSTRAINTS)
    while len(ids) < k:
        options = [c for c in candidates if compatible([*ids, c])]
        if not options:
            break
        ids.append(rng.choice(options))
    return [{"id": cid, "args": CONSTRAINTS[cid].sample_args(rng)} for cid in ids]


def split_templates(seed: int, heldout_frac: float) -> tuple[frozenset[str], frozenset[str]]:
    """Shuffle task templates by `seed` and hold out a fraction of them."""
    if not 0.0 < heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must be in (0, 1), got {heldout_frac}")
    names = [name for name, _ in TASKS]
    random.Random(seed).shuffle(names)
    n_heldout = max(1, round(len(names) * heldout_frac))
    return frozenset(names[n_heldout:]), frozenset(names[:n_heldout])


def generate_instructions(n: int, seed: int = 0, heldout_frac: float = 0.4,
                          max_constraints: int = 3) -> list[InstructionRecord]:
    """Build `n` distinct prompts; each carries 1..max_constraints constraints and its split.

    Deterministic in (n, seed, heldout_frac, max_constraints).
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    _, heldout = split_templates(seed, heldout_frac)
    rng = random.Random(seed + 1)
    records: list[InstructionRecord] = []
    seen: set[str] = set()
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 50 * n:
            raise RuntimeError(f"could only build {len(records)} distinct prompts out of {n}")
        name, template = rng.choice(TASKS)
        topic = rng.choice(TOPICS)
        k = rng.choices(range(1, max_constraints + 1), weights=_k_weights(max_constraints))[0]
        constraints = sample_constraints(rng, k)
        prompt = " ".join([template.format(topic=topic)]
                          + [describe(c["id"], c["args"]) for c in constraints])
        if prompt in seen:
            continue
        seen.add(prompt)
        split = "heldout" if name in heldout else "train"
        records.append(InstructionRecord(f"if-{len(records):05d}", prompt, tuple(constraints),
                                         name, topic, split))
    return records


def _k_weights(max_constraints: int) -> Sequence[float]:
    # Single-constraint prompts are the easiest learning signal, so they are the most common.
    return [1.0 / (i + 1) for i in range(max_constraints)]
