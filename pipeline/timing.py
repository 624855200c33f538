"""Where a job's wall time goes: consecutive phases timed on the driver, for its result (what a
run spends beyond the model's own work: start-up, scheduling, conversions, commits)."""

from __future__ import annotations

import time


class Laps:
    """`laps("phase")` ends a phase begun at the previous call (or at creation); `seconds` holds each."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._last, 3)
        self._last = now
