"""Preset transitions as pure functions of time: how far a crossfade is, and what it blends.

A switch from preset A to preset B that starts at ``start`` and lasts ``duration`` seconds
conditions the frame processed at time ``now`` on ``(1 - w) * A + w * B`` with
``w = clamp((now - start) / duration, 0, 1)`` (linear in time), for the prompt embeddings,
``guidance_scale`` and ``delta``. Discrete fields (``seed``, ``t_index_list``, ``cfg_type``,
SSF settings) take B's value when the switch starts. A zero duration is a cut.
"""

from __future__ import annotations

from dataclasses import dataclass


def crossfade_weight(start: float, duration: float, now: float) -> float:
    """Progress of a crossfade in ``[0, 1]``; 1 once it is over (or for a cut)."""
    if duration <= 0:
        return 1.0
    return min(1.0, max(0.0, (now - start) / duration))


def lerp(a: float, b: float, weight: float) -> float:
    """``(1 - weight) * a + weight * b``."""
    return a + (b - a) * weight


@dataclass(frozen=True)
class Crossfade:
    """A crossfade in progress between two sets of blended scalars."""

    start: float
    duration: float
    guidance: tuple[float, float]
    delta: tuple[float, float]

    def weight(self, now: float) -> float:
        return crossfade_weight(self.start, self.duration, now)

    def scalars(self, weight: float) -> tuple[float, float]:
        """``(guidance_scale, delta)`` at ``weight``."""
        return lerp(*self.guidance, weight), lerp(*self.delta, weight)
