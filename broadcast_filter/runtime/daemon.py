"""The running daemon: three threads joined by latest-value slots, and a main-thread loop.

::

    source ─▶ ingest ─▶ [input slot] ─▶ engine ─────────────▶ [output slot] ─▶ output ─▶ sinks
              thread    newest frame     thread                newest output    thread
              (never    only             Controller.process                     paced at fps,
              waits)                                                            repeats the last

The main thread waits for a stop (SIGINT/SIGTERM, ``--frames``, ``--duration``, end of a
file, a fatal error), draws the status line and polls the presets folder for edits.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from broadcast_filter.control.config import (
    ConfigError,
    DaemonConfig,
    Issue,
    ModelSettings,
    SinkSettings,
    UsageError,
    line_of,
)
from broadcast_filter.control.presets import Preset, PresetLibrary
from broadcast_filter.media.base import Frame, Sink, Source, SourceLost
from broadcast_filter.runtime.controller import Controller, Output
from broadcast_filter.runtime.pacing import PaceState, pace
from broadcast_filter.runtime.slots import LatestSlot
from broadcast_filter.runtime.telemetry import StatusLine, Telemetry, format_status

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
    ) -> None:
        self.source, self.controller, self.telemetry = source, controller, telemetry
        self.fps, self.limits = fps, limits
        self.status = status or StatusLine(sys.stderr)
        self.sinks: dict[str, Sink] = dict(sinks)
        self.failed_sinks: dict[str, str] = {}
        self.input: LatestSlot[Frame] = LatestSlot()
        self.output: LatestSlot[Output] = LatestSlot()
        self.failure: str | None = None
        self.stopped_because = ""
        self._stop = threading.Event()
        self._source_ended = threading.Event()
        self._source_lost = False
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._started_output: float | None = None

    # ------------------------------------------------------------------ control

    def stats(self) -> dict[str, Any]:
        """The telemetry snapshot (what the status line shows) plus sink health."""
        snap = self.telemetry.snapshot(time.monotonic()).as_dict()
        sinks, failed = sorted(self.sinks.copy()), self.failed_sinks.copy()
        return {**snap, "sinks": sinks, "failed_sinks": failed}

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

    def run(self) -> int:
        """Run until stopped; return the exit code (0, or 1 after a runtime failure)."""
        restore = self._install_signals()
        try:
            self.start()
            last_poll = time.monotonic()
            while not self._stop.wait(0.1):
                now = time.monotonic()
                if now - last_poll >= PRESET_POLL_S:
                    last_poll = now
                    self._reload_presets()
                self._check_limits(now)
                self.status.update(format_status(self.telemetry.snapshot(now)), now)
        finally:
            self.stop()
            restore()
        return 1 if self.failure else 0

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
            self.status.log(f"output thread stuck in a sink; not closing: {', '.join(self.sinks)}")
        else:  # the output thread closed its sinks on the way out; these never got a thread
            for name in list(self.sinks):
                self._close_sink(name)
        snap = self.telemetry.snapshot(time.monotonic())
        self.status.finish(
            f"{format_status(snap)}  frames out {snap.frames_out} ({self.stopped_because})"
        )

    # ------------------------------------------------------------------ main-thread helpers

    def _install_signals(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, _frame: object) -> None:
            self.request_stop(signal.Signals(signum).name)
            signal.signal(signum, signal.SIG_DFL)  # a second signal kills at once

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, h)

        return restore

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
                    self.input.put(frame)
                    self.telemetry.frame_in(time.monotonic(), self.input.dropped)
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
        """Take the newest frame, let the controller style it, publish the result."""
        while not self._stop.is_set():
            frame = self.input.take(timeout=0.1)
            if frame is None:
                continue
            try:
                output = self.controller.process(frame, time.monotonic())
            except Exception as exc:
                self._fail(f"engine thread failed: {exc!r}")
                return
            self.output.put(output)

    def _output_loop(self) -> None:
        """Send the newest output to every sink at the target rate, repeating when needed.
        The sinks belong to this thread: it closes them when it ends (files are finalised)."""
        try:
            self._paced_sends()
        finally:
            for name in list(self.sinks):
                self._close_sink(name)

    def _paced_sends(self) -> None:
        while not self.output.wait_first(timeout=0.1):
            if self._stop.is_set():
                return
        state = PaceState.at_fps(self.fps)
        self._started_output = time.monotonic()
        last_version = 0
        while not self._stop.is_set():
            state, delay = pace(state, time.monotonic())
            if delay > 0 and self._stop.wait(delay):
                return
            output, version = self.output.peek()
            if output is None:
                return
            self._send(output.image)
            now = time.monotonic()
            self.telemetry.frame_out(
                now, now - output.captured_at if version != last_version else None
            )
            last_version = version
            if self.limits.frames is not None and state.emitted >= self.limits.frames:
                self.request_stop(f"--frames {self.limits.frames}")
                return

    def _send(self, image: Any) -> None:
        for name, sink in list(self.sinks.items()):
            try:
                sink.send(image)
            except Exception as exc:  # one sink's failure must not stop the others
                self.failed_sinks[name] = str(exc) or repr(exc)
                self._close_sink(name)
                left = ", ".join(self.sinks) or "none"
                self.status.log(f"sink {name} failed: {exc!r}; still sending to: {left}")
        if not self.sinks:
            self._fail("every sink failed")

    def _close_sink(self, name: str) -> None:
        sink = self.sinks.pop(name, None)
        if sink is None:
            return
        try:
            sink.close()
        except Exception as exc:  # close must not raise; report if it does
            self.status.log(f"closing sink {name} failed: {exc!r}")


# ------------------------------------------------------------------ building from a config


def open_sinks(
    sinks: Sequence[SinkSettings], width: int, height: int, fps: float
) -> list[tuple[str, Sink]]:
    """Open every sink, or none: on a failure the ones already open are closed again."""
    from broadcast_filter.media.open import open_sink

    opened: list[tuple[str, Sink]] = []
    try:
        for settings in sinks:
            sink = open_sink(settings.url, width=width, height=height, fps=fps, **settings.options)
            opened.append((settings.url, sink))
    except BaseException:
        for _, sink in opened:
            sink.close()
        raise
    return opened


def start_preset(config: DaemonConfig, library: PresetLibrary, name: str | None) -> Preset:
    """The preset to start with: ``name`` (from ``--preset``), else the config's
    ``presets.start``, else the first in the folder."""
    chosen = name or config.presets.start
    names = library.names()
    if chosen in library.errors:
        raise library.errors[chosen]
    if chosen is not None and chosen in names:
        return library.get(chosen)
    folder = config.presets_folder
    known = f"known in {folder}: {', '.join(names) or 'none'}"
    if name is not None:
        raise UsageError(f"--preset {name}: no such preset ({known})")
    if chosen is not None:
        line = line_of(config.path, "presets", "start")
        message = f"no preset named {chosen!r} ({known})"
        raise ConfigError([Issue(str(config.path), line, "presets.start", message)])
    if not names:
        line = line_of(config.path, "presets", "folder")
        raise ConfigError(
            [Issue(str(config.path), line, "presets.folder", f"no presets in {folder}")]
        )
    return library.get(names[0])


def build_daemon(
    config: DaemonConfig,
    *,
    preset: str | None = None,
    limits: Limits = Limits(),
    status: StatusLine | None = None,
    progress: bool = True,
) -> Daemon:
    """Load presets and model (with progress bars), open sinks, then the source.

    Raises :class:`ConfigError` (exit 2), or :class:`MediaError` / model errors (exit 1).
    """
    from broadcast_filter.media.open import open_source
    from broadcast_filter.runtime.engine import Engine, load_engine

    status = status or StatusLine(sys.stderr)
    library = PresetLibrary(config.presets_folder)
    for change in library.scan():
        if change.error is not None:
            status.log(str(change.error))
    first = start_preset(config, library, preset)
    telemetry = Telemetry(config.fps)
    w, h = config.width, config.height

    def load(settings: ModelSettings, chosen: Preset) -> Engine:
        return load_engine(settings, w, h, chosen, progress=False)

    engine = load_engine(first.model_settings(config.model), w, h, first, progress=progress)
    controller = Controller(library, first, engine, config.model, load, telemetry, status.log)
    telemetry.set_state(preset=first.name, mode="starting", bypass=False)
    sinks = open_sinks(config.sinks, w, h, config.fps)
    try:
        src = config.source
        source = open_source(src.url, width=w, height=h, fps=config.fps, fit=src.fit, **src.options)
    except BaseException:
        for _, sink in sinks:
            sink.close()
        raise
    return Daemon(source, sinks, controller, telemetry, config.fps, limits=limits, status=status)
