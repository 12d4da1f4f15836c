"""Where a step's time goes: schedule, prepare inputs, model, sample, output, stream.

Always on (one perf_counter per phase boundary, well under a microsecond per step's phase);
`bench/step_profile.py` reads it, and `reset()` starts a new window. The lifetime totals are
never reset: /metrics exports them (ServerMetrics.update_engine).
"""
from __future__ import annotations

import time

PHASES = ("schedule", "prepare", "model", "sample", "output", "stream")


class StepProfiler:
    """Seconds spent per phase and steps seen, since the last reset."""

    def __init__(self) -> None:
        self.lifetime_seconds = dict.fromkeys(PHASES, 0.0)
        self.lifetime_steps = 0
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.num_steps = 0
        self.num_rows = 0  # sampled rows, so a window's mean batch size is known

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def add(self, phase: str, since: float) -> float:
        """Charge the time since `since` to `phase`; return now (the next phase's start)."""
        now = time.perf_counter()
        self.seconds[phase] += now - since
        self.lifetime_seconds[phase] += now - since
        return now

    def step_done(self) -> None:
        """Count a step that ran the model, in the window and in the lifetime total."""
        self.num_steps += 1
        self.lifetime_steps += 1

    def per_step_ms(self) -> dict[str, float]:
        steps = max(1, self.num_steps)
        return {phase: 1000.0 * s / steps for phase, s in self.seconds.items()}
