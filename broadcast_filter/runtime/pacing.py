"""Output pacing as a pure function: when is the next frame due, given the clock.

The output thread calls :func:`pace` once per frame, sleeps the returned delay, then sends
whatever output is newest (repeating the last one when the model is slower than the rate).
Ticks stay on a fixed grid (``start + k * period``), so the rate does not drift with sleep
jitter. After a stall longer than ``max_late`` periods the missed ticks are skipped (and
counted) instead of being sent in a burst.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class PaceState:
    """Where the output clock stands. ``next_due`` is ``None`` until the first frame."""

    period: float
    next_due: float | None = None
    emitted: int = 0
    missed: int = 0
    max_late: int = 2

    @classmethod
    def at_fps(cls, fps: float) -> PaceState:
        return cls(period=1.0 / fps)


def pace(state: PaceState, now: float) -> tuple[PaceState, float]:
    """Schedule one frame: return the new state and how long to wait before sending it."""
    due = now if state.next_due is None else state.next_due
    late = now - due
    missed = 0
    if late > state.max_late * state.period:
        missed = int(late // state.period)
        due += missed * state.period
    new = replace(
        state,
        next_due=due + state.period,
        emitted=state.emitted + 1,
        missed=state.missed + missed,
    )
    return new, max(0.0, due - now)
