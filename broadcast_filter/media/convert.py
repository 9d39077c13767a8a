"""Frame conversion: any decoded frame to RGB at the engine's size, with one fit policy.

Fit policies, for a source whose aspect ratio differs from the output's:

- ``crop`` (default): scale to *cover* the output, keep the centre, cut the overflow.
- ``letterbox``: scale to *fit* inside the output, centre it, fill the rest with black bars.
- ``stretch``: scale each axis independently; the picture is distorted.

:class:`FrameConverter` does the scaling and the colour conversion in one swscale call (PyAV's
reformatter, on the caller's thread: the source's thread, never the inference thread);
:func:`fit_image` is the same geometry in pure numpy for RGB arrays (tests, passthrough).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import av
import numpy as np
from av.video.reformatter import VideoReformatter

FitPolicy = Literal["crop", "letterbox", "stretch"]
FIT_POLICIES: tuple[str, ...] = get_args(FitPolicy)


@dataclass(frozen=True)
class Fit:
    """Where a source lands in the output.

    The whole source is scaled to ``scaled_width x scaled_height``; the ``width x height``
    region at ``(src_x, src_y)`` of that scaled image is copied to ``(dst_x, dst_y)`` of the
    output; the rest of the output is black.
    """

    scaled_width: int
    scaled_height: int
    src_x: int
    src_y: int
    dst_x: int
    dst_y: int
    width: int
    height: int


def fit_geometry(
    src_width: int, src_height: int, width: int, height: int, policy: FitPolicy = "crop"
) -> Fit:
    """Compute how a ``src_width x src_height`` picture fills a ``width x height`` output."""
    if min(src_width, src_height, width, height) < 1:
        raise ValueError(
            f"sizes must be positive, got source {src_width}x{src_height}, output {width}x{height}"
        )
    if policy == "stretch":
        return Fit(width, height, 0, 0, 0, 0, width, height)
    wider = src_width * height >= src_height * width  # source aspect >= output aspect
    if policy == "crop":
        if wider:
            sw, sh = max(width, round(src_width * height / src_height)), height
        else:
            sw, sh = width, max(height, round(src_height * width / src_width))
        return Fit(sw, sh, (sw - width) // 2, (sh - height) // 2, 0, 0, width, height)
    if policy == "letterbox":
        if wider:
            sw, sh = width, max(1, min(height, round(src_height * width / src_width)))
        else:
            sw, sh = max(1, min(width, round(src_width * height / src_height))), height
        return Fit(sw, sh, 0, 0, (width - sw) // 2, (height - sh) // 2, sw, sh)
    raise ValueError(f"unknown fit policy {policy!r}; use one of {', '.join(FIT_POLICIES)}")


def fit_image(image: np.ndarray, width: int, height: int, policy: FitPolicy = "crop") -> np.ndarray:
    """Fit an ``(H, W, C)`` array into ``(height, width, C)`` with nearest-neighbour sampling."""
    src_h, src_w = image.shape[:2]
    g = fit_geometry(src_w, src_h, width, height, policy)
    # centre-sampled nearest neighbour, computed only for the region that is kept
    rows = ((np.arange(g.src_y, g.src_y + g.height) + 0.5) * src_h / g.scaled_height).astype(int)
    cols = ((np.arange(g.src_x, g.src_x + g.width) + 0.5) * src_w / g.scaled_width).astype(int)
    out = np.zeros((height, width, *image.shape[2:]), dtype=image.dtype)
    out[g.dst_y : g.dst_y + g.height, g.dst_x : g.dst_x + g.width] = image[rows[:, None], cols]
    return out


class FrameConverter:
    """Convert decoded :class:`av.VideoFrame` s of any format and size to RGB at one size.

    One swscale context is kept and reused while the source's size and format stay the same.
    Each call returns a new C-contiguous ``(height, width, 3)`` uint8 array (the consumer may
    hold it while the next frame is converted), always of the same size.
    """

    def __init__(
        self,
        width: int,
        height: int,
        fit: FitPolicy = "crop",
        *,
        interpolation: str = "BILINEAR",
    ) -> None:
        if fit not in FIT_POLICIES:
            raise ValueError(f"unknown fit policy {fit!r}; use one of {', '.join(FIT_POLICIES)}")
        self.width, self.height, self.fit = width, height, fit
        self._interpolation = interpolation
        self._reformatter = VideoReformatter()
        self._geometry: tuple[tuple[int, int], Fit] | None = None

    def geometry(self, src_width: int, src_height: int) -> Fit:
        """The fit for a source size (cached: sources rarely change size)."""
        if self._geometry is None or self._geometry[0] != (src_width, src_height):
            fit = fit_geometry(src_width, src_height, self.width, self.height, self.fit)
            self._geometry = ((src_width, src_height), fit)
        return self._geometry[1]

    def convert(self, frame: av.VideoFrame) -> np.ndarray:
        """Scale and convert one frame to RGB at the output size."""
        g = self.geometry(frame.width, frame.height)
        rgb = self._reformatter.reformat(
            frame,
            g.scaled_width,
            g.scaled_height,
            "rgb24",
            interpolation=self._interpolation,
            threads=1,
        )
        scaled = rgb.to_ndarray()  # a view with the frame's line padding
        region = scaled[g.src_y : g.src_y + g.height, g.src_x : g.src_x + g.width]
        if g.width == self.width and g.height == self.height:
            return region.copy()  # own the pixels: the frame's buffer goes back to its pool
        out = np.zeros((self.height, self.width, 3), dtype=np.uint8)
        out[g.dst_y : g.dst_y + g.height, g.dst_x : g.dst_x + g.width] = region
        return out
