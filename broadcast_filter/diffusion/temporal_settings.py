"""Temporal consistency settings, without torch: what a preset's ``temporal:`` section holds.

Each technique is off at its default, and a stream with every technique off computes exactly
what it computed before they existed. The techniques themselves live in
:mod:`broadcast_filter.diffusion.temporal`.
"""

from __future__ import annotations

from dataclasses import dataclass

from broadcast_filter.setting import setting


@dataclass(frozen=True)
class TemporalSettings:
    """Less flicker on moving video: latent feedback, flow-guided output blend and the
    extended self-attention cache, with the hard-cut rule that resets them."""

    feedback: float = setting(
        0.0, lo=0, hi=0.4, help="previous output latent blended into the input latent (0..0.4)"
    )
    flow_blend: float = setting(
        0.0, lo=0, hi=0.9, help="previous output, moved by the input's motion, blended in"
    )
    flow_size: int = setting(
        128, lo=16, hi=1024, help="the motion for flow_blend is estimated at most this wide/high"
    )
    cache_frames: int = setting(
        0, lo=0, hi=4, help="earlier frames the UNet's self-attention also attends to"
    )
    cache_interval: int = setting(1, lo=1, hi=100, help="frames between attention cache refreshes")
    cut_threshold: float = setting(
        0.5, lo=0, hi=1, help="input correlation below which everything resets; 0: never"
    )

    @property
    def active(self) -> bool:
        """Whether any technique is on (off: the pipeline runs exactly as without them)."""
        return self.feedback > 0 or self.flow_blend > 0 or self.cache_frames > 0
