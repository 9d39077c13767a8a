"""Pictures the output makes by itself: the "no signal" slate, the input scaled to the output
size (passthrough), and the crossfade between input and filtered picture."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@lru_cache(maxsize=8)
def _slate(width: int, height: int, title: str, detail: str) -> np.ndarray:
    image = Image.new("RGB", (width, height), (24, 24, 32))
    draw = ImageDraw.Draw(image)
    bar = max(2, height // 24)
    for i, colour in enumerate(((200, 40, 40), (220, 220, 220), (40, 40, 200))):
        draw.rectangle((0, i * bar, width, (i + 1) * bar), fill=colour)
    big = ImageFont.load_default(size=max(8, height // 8))
    small = ImageFont.load_default(size=max(6, height // 24))
    for text, font, y in ((title, big, 0.42), (detail, small, 0.62)):
        box = draw.textbbox((0, 0), text, font=font)
        x = (width - (box[2] - box[0])) // 2
        draw.text((x, int(height * y)), text, fill=(235, 235, 235), font=font)
    slate = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    slate.setflags(write=False)
    return slate


def no_signal_slate(width: int, height: int, detail: str = "") -> np.ndarray:
    """A ``(height, width, 3)`` uint8 picture that says NO SIGNAL (and ``detail``); cached
    per text, read-only."""
    return _slate(width, height, "NO SIGNAL", detail[:60])


def fit_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` at ``width`` x ``height`` (nearest neighbour; unchanged when it already is)."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    rows = np.arange(height) * h // height
    cols = np.arange(width) * w // width
    return np.ascontiguousarray(image[rows][:, cols])


def blend(under: np.ndarray, over: np.ndarray, weight: float) -> np.ndarray:
    """``over`` on top of ``under`` at ``weight`` in [0, 1] (uint8 in and out)."""
    if weight >= 1.0:
        return over
    if weight <= 0.0:
        return under
    mixed = under.astype(np.float32) * (1.0 - weight) + over.astype(np.float32) * weight
    return mixed.round().astype(np.uint8)
