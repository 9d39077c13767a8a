"""Stochastic Similarity Filter: skip inference on frames that barely changed.

The filter compares each input with the last input that was *processed* (cosine similarity
of small copies in ``[-1, 1]``), skips with probability
``p = max(0, 1 - (1 - s) / (1 - threshold))`` and never skips more than ``max_skip`` frames
in a row. A skipped frame re-emits the previous output; that is the caller's job.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F


def skip_probability(similarity: float, threshold: float) -> float:
    """The SSF rule: 0 below ``threshold``-ish similarity, rising to 1 for identical frames."""
    return max(0.0, 1.0 - (1.0 - similarity) / (1.0 - threshold))


class SimilarityFilter:
    """Decide per frame whether to skip the model. Call it with the ``(F, 3, H, W)`` input."""

    def __init__(
        self,
        threshold: float = 0.98,
        max_skip: int = 10,
        size: int = 64,
        seed: int | None = None,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if max_skip < 0:
            raise ValueError(f"max_skip must be >= 0, got {max_skip}")
        self.threshold, self.max_skip, self.size = threshold, max_skip, size
        self._rng = random.Random(seed)
        self._reference: torch.Tensor | None = None
        self._run = 0
        self.processed = 0
        self.skipped = 0
        self.last_similarity = 0.0

    @property
    def skip_ratio(self) -> float:
        total = self.processed + self.skipped
        return self.skipped / total if total else 0.0

    def reset(self) -> None:
        """Forget the reference frame (e.g. after a preset or source change)."""
        self._reference = None
        self._run = 0

    def _thumbnail(self, image: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(image.float(), size=(self.size, self.size), mode="area")
        return (small * 2 - 1).flatten()

    def __call__(self, image: torch.Tensor) -> bool:
        """Return True to skip this frame. Costs one small device-to-host read."""
        thumb = self._thumbnail(image)
        if self._reference is not None:
            similarity = F.cosine_similarity(thumb, self._reference, dim=0).item()
            self.last_similarity = similarity
            p = skip_probability(similarity, self.threshold)
            if self._run < self.max_skip and self._rng.random() < p:
                self._run += 1
                self.skipped += 1
                return True
        self._reference = thumb
        self._run = 0
        self.processed += 1
        return False
