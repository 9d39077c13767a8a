"""The demo model's styles: one prompt and one deterministic image filter per style.

The demo model (:mod:`broadcast_filter.diffusion.offline`, ``demo``) was trained to map an
image ``x`` with prompt ``s`` to ``STYLES[s](x)``; tests and ``scripts/bench_quality.py``
measure the pipeline's output against the same filters. Images are ``float32`` arrays of
shape ``(H, W, 3)``, RGB in ``[0, 1]``. Pure numpy, no torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["STYLES", "edge_magnitude", "luma"]

Image = np.ndarray
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def luma(image: Image) -> np.ndarray:
    """Rec. 601 luma, ``(H, W)``."""
    return image @ LUMA


def _blur3(plane: np.ndarray) -> np.ndarray:
    """3x3 binomial blur with edge replication."""
    p = np.pad(plane, 1, mode="edge")
    rows = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 4


def edge_magnitude(image: Image) -> np.ndarray:
    """Sobel gradient magnitude of the blurred luma, ``(H, W)``, roughly in ``[0, 1]``."""
    p = np.pad(_blur3(luma(image)), 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return np.sqrt(gx * gx + gy * gy) / 4


def sepia(image: Image) -> Image:
    """Warm brown monochrome with lifted blacks."""
    y = luma(image)[..., None]
    return np.clip(0.08 + y * np.array([0.95, 0.72, 0.45], dtype=np.float32), 0, 1)


def neon_edges(image: Image) -> Image:
    """Magenta edges on black; the strongest edges burn towards white."""
    m = np.clip(edge_magnitude(image) * 4, 0, 1)[..., None]
    out = m * np.array([1.0, 0.2, 0.9], dtype=np.float32) + m**2 * np.array([0, 0.7, 0.1])
    return np.clip(out, 0, 1).astype(np.float32)


def pencil_sketch(image: Image) -> Image:
    """Dark graphite lines and light shading on off-white paper."""
    shade = 0.8 + 0.2 * luma(image) - 2.5 * edge_magnitude(image)
    paper = np.array([0.97, 0.95, 0.9], dtype=np.float32)
    return np.clip(shade[..., None] * paper, 0, 1).astype(np.float32)


def pop_art(image: Image) -> Image:
    """Saturation boosted, then posterized to three levels per channel."""
    y = luma(image)[..., None]
    vivid = np.clip(y + 2.0 * (image - y), 0, 1)
    return (np.round(vivid * 2) / 2).astype(np.float32)


def blue_night(image: Image) -> Image:
    """Dark, blue-tinted monochrome with a faint trace of the original colour."""
    y = luma(image)[..., None]
    tint = y * np.array([0.2, 0.38, 0.85], dtype=np.float32) + 0.1 * (image - y)
    return np.clip(0.03 + tint, 0, 1).astype(np.float32)


# Prompt -> filter. The order is the order of the confusion matrices in tests and benchmarks.
STYLES: dict[str, Callable[[Image], Image]] = {
    "sepia photograph": sepia,
    "neon edges on black": neon_edges,
    "pencil sketch": pencil_sketch,
    "pop-art posterized": pop_art,
    "cool blue night": blue_night,
}
