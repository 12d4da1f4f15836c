"""The level-interleaved schedule of `bench.peers --rounds N`, and pooling its rounds.

Run one server through every level and then the next, and a machine whose speed drifts
(a shared VM's can halve within minutes) hands the loss to whoever runs later. Interleaved,
all servers stay up and each level is run `rounds` times per server, the order reversed from
one round to the next (A B, B A, A B, ...), so a drift that is steady over a level lands on
every server alike. Each (level, round) sends prompts of its own seed, so no round reads
another's prompts from a prefix cache; the rounds of one (server, level) are then pooled
into one result: their requests together over their summed time.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.load import LevelResult
from bench.metrics import summarize

MAX_ROUNDS = 10  # round seeds step by 10 inside a level's block of 100 (see round_seed)


@dataclass(frozen=True)
class Slot:
    """One run in the schedule: server `name` through level `level` (an index), round `round`."""

    level: int
    round: int
    name: str


def schedule(names: tuple[str, ...], num_levels: int, rounds: int) -> list[Slot]:
    """Levels in order; inside a level, `rounds` passes over the servers, each pass in the
    opposite order to the one before, and each level opening in the order opposite to the
    previous level's opening (rounds=2: A B B A, then B A A B), so no server always goes first.

    Raises:
        ValueError: rounds outside 1..MAX_ROUNDS, no servers, or a server named twice.
    """
    if not 1 <= rounds <= MAX_ROUNDS:
        raise ValueError(f"rounds must be in 1..{MAX_ROUNDS}, got {rounds}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"need distinct server names, got {names}")
    backward = tuple(reversed(names))
    return [Slot(level, r, name)
            for level in range(num_levels) for r in range(rounds)
            for name in (names if (level + r) % 2 == 0 else backward)]


def round_seed(level_seed: int, round_index: int) -> int:
    """Prompt seed of one round of a level: the level's seed (round 0: the one-pass run's own
    prompts), then +10, +20, ...; level seeds are 100 apart and warm-up uses seed 1."""
    if not 0 <= round_index < MAX_ROUNDS:
        raise ValueError(f"round index must be in 0..{MAX_ROUNDS - 1}, got {round_index}")
    return level_seed + 10 * round_index


def pool_rounds(rounds: list[LevelResult]) -> LevelResult:
    """One (server, level)'s rounds as one result: every request, over the rounds' summed
    time (the gaps between rounds, when other servers ran, are not counted).

    Raises:
        ValueError: no rounds, or rounds of different servers or levels.
    """
    if not rounds:
        raise ValueError("no rounds to pool")
    first = rounds[0]
    if any(r.target != first.target or r.level != first.level for r in rounds):
        raise ValueError("rounds of different servers or levels cannot be pooled")
    records = tuple(rec for r in rounds for rec in r.records)
    duration = sum(r.duration for r in rounds)
    not_started = sum(r.num_not_started for r in rounds)
    return LevelResult(first.target, first.model, first.level, records, duration, not_started,
                       summarize(list(records), duration, not_started))
