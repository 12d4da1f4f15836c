"""Extractive answers: the output must be one contiguous span of one of the given token
sequences (the retrieved passages), then an end token.

The state after a prefix y of the output is the set of positions in the passages' tokens at
which y ends; the next token may be any token that follows one of those positions, or an
end token once y is non-empty. That set is what a suffix automaton would hold, kept as a
sorted position array here (passages are a few thousand tokens; numpy filters it per step).
The state is recomputed from the sequence's own tokens when they are not the cached tokens
plus one, so forks and rewinds need nothing.
"""
from __future__ import annotations

import numpy as np

from server.engine.sequence import Sequence

SEPARATOR = -1


class SpanConstraint:
    """`sequences`: the token ids of each passage; `can_start[i][j]`: whether a span may begin
    at token j of passage i (e.g. only at word starts; default: anywhere)."""

    def __init__(self, sequences: list[list[int]], end_token_ids: tuple[int, ...] | list[int],
                 can_start: list[list[bool]] | None = None) -> None:
        if not end_token_ids:
            raise ValueError("an extractive answer needs at least one end token")
        parts: list[int] = []
        start_ok: list[bool] = []
        for i, ids in enumerate(sequences):
            parts.extend(int(t) for t in ids)
            start_ok.extend(can_start[i] if can_start is not None else [True] * len(ids))
            parts.append(SEPARATOR)
            start_ok.append(False)
        if len(start_ok) != len(parts):
            raise ValueError("can_start must give one flag per token")
        self.tokens = np.array(parts or [SEPARATOR], dtype=np.int64)
        self.start_ok = np.array(start_ok or [False], dtype=bool)
        self.end_token_ids = sorted(set(int(t) for t in end_token_ids))
        first = np.unique(self.tokens[self.start_ok & (self.tokens != SEPARATOR)])
        self.first_tokens = first.tolist() or self.end_token_ids
        self._state: dict[int, tuple[list[int], np.ndarray]] = {}  # seq_id -> (its tokens, end positions)

    def positions(self, output_ids: list[int], key: int | None = None) -> np.ndarray:
        """Positions where `output_ids` ends as a span (empty: it is not a span)."""
        cached = self._state.get(key) if key is not None else None
        # The cache holds the tokens it was computed for: after a rewind the sequence may
        # have the same length but other tokens, so the length alone cannot validate it.
        if cached is not None and cached[0] == output_ids:
            return cached[1]
        if cached is not None and len(cached[0]) == len(output_ids) - 1 and cached[0] == output_ids[:-1]:
            pos = self._step(cached[1], output_ids[-1])
        else:
            pos = None
            for t in output_ids:
                pos = self._step(pos, t)
        if key is not None:
            self._state[key] = (list(output_ids), pos)
        return pos

    def _step(self, pos: np.ndarray | None, token: int) -> np.ndarray:
        if pos is None:  # the first token starts a span wherever one may start
            return np.flatnonzero((self.tokens == token) & self.start_ok)
        nxt = pos + 1
        return nxt[self.tokens[nxt] == token]

    def allowed_tokens(self, seq: Sequence) -> list[int] | None:
        out = seq.output_token_ids
        if not out:
            return self.first_tokens
        pos = self.positions(out, seq.seq_id)
        follow = self.tokens[pos + 1] if len(pos) else np.zeros(0, np.int64)
        return sorted(set(np.unique(follow[follow != SEPARATOR]).tolist()) | set(self.end_token_ids))
