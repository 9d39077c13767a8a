"""The running daemon: three threads joined by latest-value slots, and a main-thread loop.

::

    source ─▶ ingest ─▶ [input slot] ─▶ engine ─────────────▶ [output slot] ─▶ output ─▶ sinks
              thread    newest frame     thread                newest output    thread
              (never    only             Controller.process                     paced at fps,
              waits)                                                            repeats the last

The main thread waits for a stop (SIGINT/SIGTERM, ``--frames``, ``--duration``, end of a
file, a fatal error), draws the status line, polls the presets folder for edits and re-opens
failed sinks (:class:`~broadcast_filter.runtime.sink_group.SinkGroup`). What each output tick
sends is chosen by :class:`~broadcast_filter.runtime.on_air.Switcher`; building a daemon from
a config is :mod:`broadcast_filter.runtime.build`.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from broadcast_filter.control.config import ConfigError
from broadcast_filter.media.audio import CHANNELS, RATE
from broadcast_filter.media.base import Frame, Sink, Source, SourceLost
from broadcast_filter.runtime.av_sync import AudioLine, DelayTracker, SkippedInput
from broadcast_filter.runtime.controller import Controller, Result
from broadcast_filter.runtime.on_air import Switcher
from broadcast_filter.runtime.pacing import PaceState, pace
from broadcast_filter.runtime.sink_group import SinkGroup
from broadcast_filter.runtime.telemetry import StatusLine, Telemetry, format_status
from broadcast_filter.runtime.watchdog import SafetySettings, Watchdog, classify
from broadcast_filter.slot import LatestSlot

STOP_BUDGET_S = 1.5  # joins and closes must fit in the 2 s promised for SIGINT
PRESET_POLL_S = 0.5
RETRY_SOURCE_S = 0.5


@dataclass(frozen=True)
class Limits:
    """When to stop by itself: after ``frames`` output frames or ``duration`` seconds."""

    frames: int | None = None
    duration: float | None = None


class Daemon:
    """Moves frames from ``source`` through ``controller`` to ``sinks`` until stopped."""

    def __init__(
        self,
        source: Source,
        sinks: Sequence[tuple[str, Sink]],
        controller: Controller,
        telemetry: Telemetry,
        fps: float,
        *,
        limits: Limits = Limits(),
        status: StatusLine | None = None,
        safety: SafetySettings | None = None,
        reopen_sink: Callable[[str], Sink] | None = None,
        name: str = "",
    ) -> None:
        """``reopen_sink(name)`` opens a failed sink again (retried with backoff); without
        it a failed sink stays closed. ``name`` is the stream's, when there are several.
        When the source carries audio and some sink has an audio track, the source's audio
        goes through an :class:`AudioLine` delayed by the lasting video delay."""
        self.name = name
        self.source, self.controller, self.telemetry = source, controller, telemetry
        self.fps, self.limits = fps, limits
        self.status = status or StatusLine(sys.stderr)
        self.safety = safety or SafetySettings()
        self.sinks = SinkGroup(sinks, self.safety, self.status.log, reopen_sink)
        self.input: LatestSlot[Frame] = LatestSlot()
        self.output: LatestSlot[Result] = LatestSlot()
        self.failure: str | None = None
        self.stopped_because = ""
        self._stop = threading.Event()
        self._source_ended = threading.Event()
        self._source_lost = False
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._started_output: float | None = None
        self.watchdog = Watchdog(self.safety)
        self.switcher = Switcher(
            self.watchdog, self.input, self.output, self.sinks.size, telemetry, self.status.log
        )
        self._last_input_at = time.monotonic()
        self._engine_error_logged = False
        #: extra status-line fields, name -> function giving the value (``obs connected``)
        self.status_fields: dict[str, Callable[[], object]] = {"out": self.sinks.state}
        #: called once when the daemon stops (e.g. the OBS bridge's stop)
        self.on_stop: list[Callable[[], None]] = []
        self._last_image: np.ndarray | None = None  # what the sinks got last
        self._last_poll = time.monotonic()
        self._last_out_at: float | None = None
        #: the lasting video delay (capture to sink), from every fresh picture sent
        self.delay = DelayTracker(fps)
        self._skipped = SkippedInput()
        self.audio: AudioLine | None = None
        self._audio_said = "none"
        if source.carries_audio and any(s.audio for _, s in sinks):
            rate, channels = source.audio_format or (RATE, CHANNELS)
            line = self.audio = AudioLine(self.delay, rate=rate, channels=channels)
            source.listen_audio(lambda chunk: line.put(chunk, time.monotonic()))
            if any(s.audio == "copy" for _, s in sinks):
                source.listen_coded(line.put_coded)
            self.status_fields["audio"] = self._audio_state
        controller.attach(self.details, lambda: self._last_image)

    # ------------------------------------------------------------------ control

    def stats(self) -> dict[str, Any]:
        """The telemetry snapshot (what the status line shows) plus :meth:`details`."""
        snap = self.telemetry.snapshot(time.monotonic()).as_dict()
        return {**snap, **self.details()}

    def details(self) -> dict[str, Any]:
        """Sink health, the extra status fields (source, OBS, ...), engine restarts and
        :meth:`health`."""
        sinks, failed = sorted(self.sinks.sinks.copy()), self.sinks.failed.copy()
        return {
            **({"stream": self.name} if self.name else {}),
            "sinks": sinks,
            "failed_sinks": failed,
            "fields": self._fields(),
            "engine_restarts": self.watchdog.state.restarts,
            "source_up": not self._source_lost and not self._source_ended.is_set(),
            "audio": self._audio_details(),
            "health": self.health(time.monotonic()),
        }

    def health(self, now: float) -> dict[str, Any]:
        """For supervisors: ``ready`` once the first output frame went out; ``healthy``
        while ready, running, some sink open and the output not stalled (no frame for
        ``max(1 s, 5 frame times)``); ``problems`` says what is wrong, in words."""
        problems = []
        last = self._last_out_at
        ready = last is not None
        if not ready:
            problems.append("no output frame yet")
        elif now - last > max(1.0, 5.0 / self.fps):
            problems.append(f"output stalled ({now - last:.1f} s since the last frame)")
        if not self.sinks.sinks:
            problems.append("every sink failed")
        if self._stop.is_set():
            problems.append(f"stopping ({self.stopped_because})")
        if self.failure:
            problems.append(self.failure)
        return {"ready": ready, "healthy": not problems, "problems": problems}

    def status_text(self, now: float) -> str:
        """The status line: the telemetry, then each extra field as ``name value``."""
        fields = "".join(f"  {name} {value}" for name, value in self._fields().items())
        return format_status(self.telemetry.snapshot(now)) + fields

    def _fields(self) -> dict[str, str]:
        """Extra status fields; a field whose value is ``None`` has nothing to say now."""
        values = {}
        for name, field in list(self.status_fields.items()):
            try:
                value = field()
            except Exception as exc:  # a broken field must not break the status line
                value = f"? ({exc!r})"
            if value is not None:
                values[name] = str(value)
        return values

    def _audio_details(self) -> dict[str, Any]:
        """The source's audio, the delay it is held back by and the silence put on air
        (no input for that time: no audio yet, a lost source), for the API and metrics."""
        line = self.audio
        if line is None:
            return {"source": "none", "delay_s": None, "silence_s": 0.0}
        return {
            "source": self.source.audio_state,
            "delay_s": line.delay,
            "silence_s": line.silent / line.rate,
            "skipped_s": line.skipped / line.rate,
            "frames": self.delay.frames,
            "off_sync_frames": self.delay.off_sync,
            "sinks": [name for name, sink in list(self.sinks.sinks.items()) if sink.audio],
        }

    def _audio_state(self) -> str:
        """``aac 48k stereo, delay 120 ms``: the source's audio and how long it is held."""
        assert self.audio is not None
        text = f"{self.source.audio_state}, {self.audio.state}"
        if self.audio.skipped:
            text += f", {self.audio.skipped / self.audio.rate:.1f} s skipped"
        return text

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self.stopped_because = reason
            self._stop.set()

    def start(self) -> None:
        for name, target in (
            ("ingest", self._ingest_loop),
            ("engine", self._engine_loop),
            ("output", self._output_loop),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> int:
        """Run until stopped; return the exit code (0, or 1 after a runtime failure)."""
        restore = install_signals(self.request_stop)
        try:
            self.start()
            while not self._stop.wait(0.1):
                now = time.monotonic()
                self.poll(now)
                self.status.update(self.status_text(now), now)
        finally:
            self.stop()
            restore()
        return 1 if self.failure else 0

    def poll(self, now: float) -> None:
        """The main thread's chores, every ~0.1 s: presets folder, failed sinks, limits."""
        if now - self._last_poll >= PRESET_POLL_S:
            self._last_poll = now
            self._reload_presets()
        self.sinks.retry(now, time.monotonic)
        self._check_limits(now)
        self._log_audio_state()

    def _log_audio_state(self) -> None:
        """Say each new state of the source's audio once (found, bad packets, dropped)."""
        if self.audio is None:
            return
        state = self.source.audio_state
        if state != self._audio_said:
            self._audio_said = state
            self.status.log(f"source audio: {state}")

    def stop(self) -> None:
        """Stop the threads and release source and sinks (once); within ~1.5 s."""
        if self._closed:
            return
        self._closed = True
        self.request_stop("stopped")
        deadline = time.monotonic() + STOP_BUDGET_S
        self.input.close()
        self.output.close()
        self.source.close()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.name == "output" and t.is_alive() for t in self._threads):
            stuck = ", ".join(self.sinks.sinks)
            self.status.log(f"output thread stuck in a sink; not closing: {stuck}")
        else:  # the output thread closed its sinks on the way out; these never got a thread
            self.sinks.close_all()
        for stop in self.on_stop:
            try:
                stop()
            except Exception as exc:  # one companion's failure must not stop the shutdown
                self.status.log(f"stopping {stop!r} failed: {exc!r}")
        now = time.monotonic()
        snap = self.telemetry.snapshot(now)
        self.status.finish(
            f"{self.status_text(now)}  frames out {snap.frames_out} ({self.stopped_because})"
        )

    # ------------------------------------------------------------------ main-thread helpers

    def _reload_presets(self) -> None:
        try:
            changes = self.controller.reload_presets()
        except ConfigError as exc:
            self.status.log(str(exc))
            return
        for change in changes:
            self.status.log(str(change))

    def _check_limits(self, now: float) -> None:
        started = self._started_output
        if self.limits.duration is not None and started and now - started >= self.limits.duration:
            self.request_stop(f"--duration {self.limits.duration:g}")
        if self._source_ended.is_set() and not self.input.pending:
            self.request_stop("end of source")

    def _fail(self, message: str) -> None:
        self.failure = message
        self.status.log(f"error: {message}")
        self.request_stop("failure")

    # ------------------------------------------------------------------ threads

    def _ingest_loop(self) -> None:
        """Capture at the source's own rate; only ever replaces the newest frame."""
        while not self._stop.is_set():
            try:
                for frame in self.source.frames():
                    if self._source_lost:
                        self._source_lost = False
                        self.telemetry.set_source_lost(False)
                        self.status.log("source is back")
                        self.controller.source_changed()
                    self.input.put(frame)
                    self._skipped.captured(frame.captured_at)
                    self._last_input_at = time.monotonic()
                    self.telemetry.frame_in(self._last_input_at, self.input.dropped)
                    if self._stop.is_set():
                        return
            except SourceLost as exc:
                if not self._source_lost:
                    self.status.log(f"source lost: {exc}; holding the last frame, retrying")
                self._source_lost = True
                self.telemetry.set_source_lost(True)
                self._stop.wait(RETRY_SOURCE_S)
                continue
            except Exception as exc:
                if not self._stop.is_set():
                    self._fail(f"source failed: {exc}")
                return
            self._source_ended.set()
            return

    def _engine_loop(self) -> None:
        """Take the newest frame, let the controller style it, publish the result. Every call
        is reported to the watchdog with the result's fault; a failure never stops the
        thread (nothing is styled, the input goes on air), and a run of failures restarts
        the engine."""
        while not self._stop.is_set():
            frame = self.input.take(timeout=0.1)
            if frame is None:
                continue
            self.watchdog.started(time.monotonic())
            try:
                result = self.controller.process(frame, time.monotonic())
            except Exception as exc:  # a bug or an unwrapped error: same as a model failure
                result = Result(None, frame.captured_at, "pass", classify(exc))
                if not self._engine_error_logged:
                    self.status.log(f"engine thread: {exc!r}; passing frames through")
                self._engine_error_logged = True
            else:
                self._engine_error_logged = False
            if self.watchdog.finished(time.monotonic(), result.fault):
                self.controller.restart_engine(
                    f"{self.safety.restart_after} failures: {result.fault}"
                )
            self.output.put(result)

    def _output_loop(self) -> None:
        """Send each tick's picture to every sink at the target rate, repeating when needed.
        The sinks belong to this thread: it closes them when it ends (files are finalised)."""
        try:
            self._paced_sends()
        finally:
            self.sinks.close_all()

    def _paced_sends(self) -> None:
        while not self.output.wait_first(timeout=0.1):
            if self._stop.is_set():
                return
        state = PaceState.at_fps(self.fps)
        self._started_output = time.monotonic()
        last: tuple[str, int] = ("engine", 0)
        while not self._stop.is_set():
            state, delay = pace(state, time.monotonic())
            if delay > 0 and self._stop.wait(delay):
                return
            now = time.monotonic()
            picture = self.switcher.picture(
                now, input_age=now - self._last_input_at, source_lost=self._source_lost
            )
            if self.output.closed:
                return
            if picture is None:  # nothing to show this tick; never a reason to stop output
                self._send_audio(now)
                continue
            on_air = time.monotonic()  # every sink stamps the picture with this
            self.sinks.send(picture.image, on_air)
            self._last_image = picture.image
            if self.sinks.dead and not self._stop.is_set():
                self._fail("every sink failed")
            now = time.monotonic()
            fresh = picture.captured_at is not None and picture.key != last
            latency = on_air - picture.captured_at if fresh else None
            self.telemetry.frame_out(now, latency)
            if latency is not None:
                self.delay.observe(latency, self._skipped.shown(picture.captured_at))
            self._send_audio(now)
            self._last_out_at = now
            last = picture.key
            if self.limits.frames is not None and state.emitted >= self.limits.frames:
                self.request_stop(f"--frames {self.limits.frames}")
                return

    def _send_audio(self, now: float) -> None:
        """The audio due on air by now (see :class:`AudioLine`) to every sink with audio."""
        if self.audio is not None and (due := self.audio.pull(now)) is not None:
            self.sinks.send_audio(*due, now)


def install_signals(stop: Callable[[str], None]) -> Callable[[], None]:
    """SIGINT/SIGTERM call ``stop(signal name)`` (a second one kills at once); returns the
    function that restores the previous handlers. Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: object) -> None:
        stop(signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore
