"""What goes on air each output tick: the one place that chooses between the styled
picture, the live input, a crossfade between them, the held last picture and the slate.

The watchdog (:func:`~broadcast_filter.runtime.watchdog.on_air`) says which kind of picture
this tick calls for; the engine's newest :class:`~broadcast_filter.runtime.controller.Result`
says whether anything was styled. The input goes on air when the watchdog passes it through
(a failing or stalled engine) or when the result has no image (bypass, a model loading).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from broadcast_filter.media.base import Frame
from broadcast_filter.runtime.controller import Result
from broadcast_filter.runtime.slate import blend, fit_image, no_signal_slate
from broadcast_filter.runtime.telemetry import Telemetry
from broadcast_filter.runtime.watchdog import Watchdog
from broadcast_filter.slot import LatestSlot


@dataclass(frozen=True)
class Picture:
    """One tick's picture: the image, the capture time of what it shows (``None`` for the
    slate) and which picture it is (``(source, version)``, to tell a new one from a repeat)."""

    image: np.ndarray
    captured_at: float | None
    key: tuple[str, int]


class Switcher:
    """Composes each tick's picture at the sinks' size from the input and result slots."""

    def __init__(
        self,
        watchdog: Watchdog,
        inputs: LatestSlot[Frame],
        results: LatestSlot[Result],
        size: tuple[int, int] | None,
        telemetry: Telemetry,
        log: Callable[[str], None],
    ) -> None:
        self.watchdog, self.inputs, self.results = watchdog, inputs, results
        self.size, self.telemetry, self.log = size, telemetry, log

    def picture(self, now: float, *, input_age: float, source_lost: bool) -> Picture | None:
        """This tick's picture; ``None`` before the engine's first result."""
        result, version = self.results.peek()
        if result is None:
            return None
        pick, changed = self.watchdog.tick(now, input_age=input_age, source_lost=source_lost)
        if changed:
            self.telemetry.set_on_air(pick.kind, pick.reason, self.watchdog.state.switches)
            self.log(f"on air: {pick.kind}" + (f" ({pick.reason})" if pick.reason else ""))
        frame, frame_version = self.inputs.peek()
        w, h = self._size(result)
        if pick.kind == "slate":
            return Picture(no_signal_slate(w, h, pick.reason), None, ("slate", 0))
        styled = result.image
        if frame is not None and (pick.kind == "pass" or styled is None):
            return Picture(
                fit_image(frame.image, w, h), frame.captured_at, ("input", frame_version)
            )
        if styled is None:  # no input frame to pass on yet: skip the tick
            return None
        image = fit_image(styled, w, h)
        if pick.kind == "fade" and frame is not None:
            image = blend(fit_image(frame.image, w, h), image, pick.weight)
            return Picture(image, result.captured_at, ("fade", frame_version))
        return Picture(image, result.captured_at, ("engine", version))

    def _size(self, result: Result) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        frame, _ = self.inputs.peek()
        image = result.image if result.image is not None else frame.image
        return image.shape[1], image.shape[0]
