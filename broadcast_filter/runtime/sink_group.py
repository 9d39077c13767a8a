"""The sinks of a running daemon: one send to all, each failure isolated and retried.

A sink that raises is closed and reported; the others keep getting frames. When the daemon
can open sinks again (``reopen``), a failed one is re-opened from the main thread with
backoff (``safety.sink_retry_s`` doubling up to ``sink_retry_max_s``); opening may block,
sending never waits for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from broadcast_filter.backoff import backoff_delay
from broadcast_filter.media.audio import CodedAudio
from broadcast_filter.media.base import Sink
from broadcast_filter.runtime.watchdog import SafetySettings


class SinkGroup:
    """Named sinks; :meth:`send` belongs to the output thread, :meth:`retry` to the main."""

    def __init__(
        self,
        sinks: Sequence[tuple[str, Sink]],
        safety: SafetySettings,
        log: Callable[[str], None],
        reopen: Callable[[str], Sink] | None = None,
    ) -> None:
        self.sinks: dict[str, Sink] = dict(sinks)
        self.failed: dict[str, str] = {}
        self.safety, self.log, self.reopen = safety, log, reopen
        self._retry: dict[str, tuple[int, float]] = {}  # failed sink -> (attempt, due)
        first = next(iter(self.sinks.values()), None)
        self.size = (first.width, first.height) if first is not None else None

    @property
    def dead(self) -> bool:
        """Every sink failed and none can be re-opened."""
        return not self.sinks and self.reopen is None

    def state(self) -> str | None:
        """For the status line: each network or NDI sink's own state (``live, 3 dropped``)
        and each failed sink; ``None`` when there is nothing to say."""
        parts = [
            f"{name} {sink.state}"
            for name, sink in list(self.sinks.items())
            if isinstance(getattr(sink, "state", None), str)
        ]
        parts += [f"{name} failed" for name in list(self.failed)]
        return "; ".join(parts) or None

    def send(self, image: np.ndarray, at: float) -> None:
        """Send ``image``, on air at ``at``, to every open sink (each stamps it with that one
        time, whatever the sinks before it cost); a failing one is closed and scheduled
        again."""
        for name, sink in list(self.sinks.items()):
            try:
                sink.send(image, at)
            except Exception as exc:  # one sink's failure must not stop the others
                self._failed(name, exc, at)

    def send_audio(
        self,
        samples: np.ndarray,
        at: float,
        rate: int,
        coded: Sequence[tuple[CodedAudio, float]],
        now: float,
    ) -> None:
        """Send audio (``rate`` Hz) going on air at ``at`` to every open sink with audio,
        the source's ``coded`` frames within it to those that copy them."""
        for name, sink in list(self.sinks.items()):
            if not sink.audio:
                continue
            try:
                sink.send_audio(samples, at, rate, coded if sink.audio == "copy" else ())
            except Exception as exc:  # as for video: isolate, close, re-open later
                self._failed(name, exc, now)

    def _failed(self, name: str, exc: Exception, now: float) -> None:
        self.failed[name] = str(exc) or repr(exc)
        self.close(name)
        left = ", ".join(self.sinks) or "none"
        retry = ""
        if self.reopen is not None:
            self._retry[name] = (0, now + self.safety.sink_retry_s)
            retry = f"; re-opening in {self.safety.sink_retry_s:g} s"
        self.log(f"sink {name} failed: {exc!r}{retry}; still sending to: {left}")

    def retry(self, now: float, clock: Callable[[], float]) -> None:
        """Re-open failed sinks whose backoff has run out (opening may block)."""
        for name, (attempt, due) in list(self._retry.items()):
            if now < due or self.reopen is None:
                continue
            try:
                sink = self.reopen(name)
            except Exception as exc:  # still failing: wait longer, report
                s = self.safety
                delay = backoff_delay(attempt + 1, s.sink_retry_s, s.sink_retry_max_s)
                self._retry[name] = (attempt + 1, clock() + delay)
                self.failed[name] = str(exc) or repr(exc)
                self.log(f"sink {name}: re-open failed ({exc!r}); next try in {delay:g} s")
                continue
            del self._retry[name]
            self.failed.pop(name, None)
            self.sinks[name] = sink
            self.log(f"sink {name} re-opened after {attempt + 1} attempt(s)")

    def close(self, name: str) -> None:
        sink = self.sinks.pop(name, None)
        if sink is None:
            return
        try:
            sink.close()
        except Exception as exc:  # close must not raise; report if it does
            self.log(f"closing sink {name} failed: {exc!r}")

    def close_all(self) -> None:
        for name in list(self.sinks):
            self.close(name)
