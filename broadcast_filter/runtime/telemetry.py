"""Counters and rolling measurements of the running daemon, and the status line they make.

Each thread reports its own events (frame in, model step, frame out); :meth:`Telemetry.snapshot`
turns them into rates over the last two seconds and latency percentiles over the last 256
new outputs. Storage is fixed-size ring buffers: nothing grows while running.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TextIO

import numpy as np

RATE_WINDOW_S = 2.0
#: upper bounds (seconds) of the capture-to-sink latency histogram (``/metrics``)
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)


class RateMeter:
    """Events per second over the last ``window`` seconds, from a ring of timestamps."""

    def __init__(self, capacity: int = 512) -> None:
        self._times = np.full(capacity, -math.inf)
        self._next = 0

    def add(self, t: float) -> None:
        self._times[self._next] = t
        self._next = (self._next + 1) % len(self._times)

    def rate(self, now: float, window: float = RATE_WINDOW_S) -> float:
        recent = self._times[self._times > now - window]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent.min(), 1e-6)
        return float((len(recent) - 1) / span)


class Ring:
    """The last ``capacity`` values, for percentiles."""

    def __init__(self, capacity: int = 256) -> None:
        self._values = np.full(capacity, np.nan)
        self._next = 0

    def add(self, value: float) -> None:
        self._values[self._next] = value
        self._next = (self._next + 1) % len(self._values)

    def percentile(self, q: float) -> float:
        values = self._values[~np.isnan(self._values)]
        return float(np.percentile(values, q)) if len(values) else math.nan


@dataclass(frozen=True)
class Snapshot:
    """What the daemon is doing now; also ``Commands.status()``'s payload."""

    preset: str
    mode: str
    bypass: bool
    fps_in: float
    fps_model: float
    fps_out: float
    latency_ms_p50: float
    latency_ms_p95: float
    frames_in: int
    frames_model: int
    frames_skipped: int
    frames_out: int
    frames_repeated: int
    dropped: int
    skip_ratio: float
    target_fps: float
    on_air: str = "engine"  # see broadcast_filter.runtime.watchdog.ON_AIR_KINDS
    mode_switches: int = 0
    fps_engine: float = 0.0  # frames the engine handled: styled or skipped by the SSF

    @property
    def below_target(self) -> bool:
        """Styling, and the engine handles fewer frames than both the target rate and the
        source give it: the model (or the shared batch) is too slow for this stream."""
        styling = self.mode in ("styled", "crossfade")
        return styling and self.fps_engine < 0.9 * min(self.target_fps, self.fps_in)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Telemetry:
    """Thread-safe event sink for the runtime's threads."""

    def __init__(self, target_fps: float) -> None:
        self.target_fps = target_fps
        self._lock = threading.Lock()
        self._in, self._model, self._out = RateMeter(), RateMeter(), RateMeter()
        self._engine = RateMeter()
        self._latency = Ring()
        self._buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)  # the last one is +Inf
        self._latency_sum = 0.0
        self.frames_in = self.frames_model = self.frames_skipped = 0
        self.frames_out = self.frames_repeated = self.dropped = 0
        self.preset, self.mode, self.bypass = "", "starting", False
        self.source_lost = False
        self.on_air, self.on_air_reason, self.mode_switches = "engine", "", 0

    def frame_in(self, now: float, dropped: int) -> None:
        """A frame was captured; ``dropped`` is the input slot's running drop count."""
        with self._lock:
            self._in.add(now)
            self.frames_in += 1
            self.dropped = dropped

    def model_step(self, now: float, skipped: bool) -> None:
        """The engine ran the model on a frame, or the similarity filter skipped it."""
        with self._lock:
            self._engine.add(now)
            if skipped:
                self.frames_skipped += 1
            else:
                self._model.add(now)
                self.frames_model += 1

    def frame_out(self, now: float, latency: float | None) -> None:
        """A frame went to the sinks; ``latency`` (capture to sink) for a new one, ``None``
        for a repeat of the previous output."""
        with self._lock:
            self._out.add(now)
            self.frames_out += 1
            if latency is None:
                self.frames_repeated += 1
            else:
                self._latency.add(latency)
                self._latency_sum += latency
                self._buckets[bisect.bisect_left(LATENCY_BUCKETS_S, latency)] += 1

    def set_state(self, *, preset: str, mode: str, bypass: bool) -> None:
        with self._lock:
            self.preset, self.mode, self.bypass = preset, mode, bypass

    def set_source_lost(self, lost: bool) -> None:
        """A live source dropped (the output holds its last frame) or came back."""
        with self._lock:
            self.source_lost = lost

    def set_on_air(self, kind: str, reason: str, switches: int) -> None:
        """What the output sends (watchdog kind) and why; ``reason`` overrides the mode."""
        with self._lock:
            self.on_air, self.on_air_reason, self.mode_switches = kind, reason, switches

    def latency_histogram(self) -> tuple[list[tuple[float, int]], float]:
        """Every new output's latency so far: cumulative ``(upper bound s, count)`` pairs
        ending with ``(inf, total)``, and the sum of the latencies in seconds."""
        with self._lock:
            counts, total = list(self._buckets), self._latency_sum
        bounds = [*LATENCY_BUCKETS_S, math.inf]
        return list(zip(bounds, itertools.accumulate(counts), strict=True)), total

    def snapshot(self, now: float) -> Snapshot:
        with self._lock:
            total = self.frames_model + self.frames_skipped
            mode = "source lost (holding last frame)" if self.source_lost else self.mode
            return Snapshot(
                preset=self.preset,
                mode=self.on_air_reason or mode,
                bypass=self.bypass,
                fps_in=self._in.rate(now),
                fps_model=self._model.rate(now),
                fps_out=self._out.rate(now),
                latency_ms_p50=self._latency.percentile(50) * 1000,
                latency_ms_p95=self._latency.percentile(95) * 1000,
                frames_in=self.frames_in,
                frames_model=self.frames_model,
                frames_skipped=self.frames_skipped,
                frames_out=self.frames_out,
                frames_repeated=self.frames_repeated,
                dropped=self.dropped,
                skip_ratio=self.frames_skipped / total if total else 0.0,
                target_fps=self.target_fps,
                on_air=self.on_air,
                mode_switches=self.mode_switches,
                fps_engine=self._engine.rate(now),
            )


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def format_status(s: Snapshot) -> str:
    """One status line: preset and mode, then rates, latency, drops and skips."""
    return (
        f"[{s.preset or '-'} | {s.mode}] "
        f"in {s.fps_in:.1f} fps  model {s.fps_model:.1f} fps  "
        f"out {s.fps_out:.1f}/{s.target_fps:g} fps  "
        f"latency p50 {_ms(s.latency_ms_p50)} ms p95 {_ms(s.latency_ms_p95)} ms  "
        f"dropped {s.dropped}  skip {s.skip_ratio:.0%}"
    )


class StatusLine:
    """The live status line on stderr: redrawn in place (``\\r``) on a terminal every
    ``tty_interval`` seconds, else printed as a plain line every ``interval`` seconds.
    :meth:`log` prints a message without garbling the line."""

    def __init__(self, stream: TextIO, interval: float = 5.0, tty_interval: float = 0.5) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.interval = tty_interval if self.tty else interval
        self._lock = threading.Lock()
        self._last = -math.inf
        self._text = ""
        #: called with every logged message (the API's WebSocket events); must not block
        self.listeners: list[Callable[[str], None]] = []

    def update(self, text: str, now: float) -> None:
        with self._lock:
            if now - self._last < self.interval:
                return
            self._last, self._text = now, text
            self._write(text)

    def _write(self, text: str) -> None:
        self.stream.write(f"\r{text}\x1b[K" if self.tty else f"{text}\n")
        self.stream.flush()

    def log(self, message: str) -> None:
        with self._lock:
            self.stream.write(f"\r\x1b[K{message}\n" if self.tty else f"{message}\n")
            if self.tty and self._text:
                self.stream.write(self._text)
            self.stream.flush()
        for listener in list(self.listeners):
            with contextlib.suppress(Exception):  # a broken listener must not break logging
                listener(message)

    def finish(self, text: str) -> None:
        """Print the final line (always, on its own line)."""
        with self._lock:
            self.stream.write(f"\r{text}\x1b[K\n" if self.tty else f"{text}\n")
            self.stream.flush()
            self._text = ""
