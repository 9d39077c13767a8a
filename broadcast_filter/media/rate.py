"""The one conversion from a frame rate in frames per second to the exact rate codecs want."""

from __future__ import annotations

from fractions import Fraction


def frame_rate(fps: float) -> Fraction:
    """``fps`` as an exact rate: 29.97 -> 30000/1001 and 59.94 -> 60000/1001 (the NTSC family,
    which ``Fraction(fps).limit_denominator(1001)`` gets wrong: 2997/100), 25.0 -> 25."""
    if fps <= 0:
        raise ValueError(f"a frame rate must be positive, got {fps}")
    ntsc = round(fps * 1.001)
    if fps != int(fps) and abs(fps * 1.001 - ntsc) < 1e-3:
        return Fraction(ntsc * 1000, 1001)
    return Fraction(fps).limit_denominator(1001)
