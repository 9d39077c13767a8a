"""Exponential backoff, the one rule behind every retry loop (sinks, I/O processes, OBS)."""

from __future__ import annotations

import math


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """The wait before retry number ``attempt`` (0-based): ``base * 2**attempt``, capped."""
    return min(cap, base * math.pow(2.0, max(0, attempt)))


class Backoff:
    """Successive delays ``base, 2*base, 4*base ...`` up to ``cap``; :meth:`reset` on success."""

    def __init__(self, base: float, cap: float) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={base} cap={cap}")
        self.base, self.cap = base, cap
        self.attempt = 0

    @property
    def delay(self) -> float:
        """The wait the next :meth:`step` returns."""
        return backoff_delay(self.attempt, self.base, self.cap)

    def step(self) -> float:
        """The wait before the next try; the one after it is twice as long (up to ``cap``)."""
        delay = self.delay
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
