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
from pathlib import Path
from typing import Any

from broadcast_filter.backoff import backoff_delay
from broadcast_filter.control.config import (
    ConfigError,
    DaemonConfig,
    Issue,
    ModelSettings,
    SafetySettings,
    SinkSettings,
    UsageError,
    line_of,
)
from broadcast_filter.control.guard import check_preset_model
from broadcast_filter.control.presets import Preset, PresetLibrary
from broadcast_filter.media.base import Frame, Sink, Source, SourceLost
from broadcast_filter.runtime.controller import Controller, Output
from broadcast_filter.runtime.pacing import PaceState, pace
from broadcast_filter.runtime.slate import blend, fit_image, no_signal_slate
from broadcast_filter.runtime.telemetry import StatusLine, Telemetry, format_status
from broadcast_filter.runtime.watchdog import Watchdog, classify
from broadcast_filter.slot import LatestSlot

STOP_BUDGET_S = 1.5  # joins and closes must fit in the 2 s promised for SIGINT
PRESET_POLL_S = 0.5
RETRY_SOURCE_S = 0.5
DEFAULT_SAFETY = SafetySettings()


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
        safety: SafetySettings = DEFAULT_SAFETY,
        reopen_sink: Callable[[str], Sink] | None = None,
    ) -> None:
        """``reopen_sink(name)`` opens a failed sink again (retried with backoff); without
        it a failed sink stays closed."""
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
        self.safety = safety
        self.watchdog = Watchdog(safety)
        self._reopen = reopen_sink
        self._retry: dict[str, tuple[int, float]] = {}  # failed sink -> (attempt, due)
        self._last_input_at = time.monotonic()
        self._engine_error_logged = False
        first = next(iter(self.sinks.values()), None)
        self.size = (first.width, first.height) if first is not None else None
        #: extra status-line fields, name -> function giving the value (``obs connected``)
        self.status_fields: dict[str, Callable[[], object]] = {}

    # ------------------------------------------------------------------ control

    def stats(self) -> dict[str, Any]:
        """The telemetry snapshot (what the status line shows) plus sink health."""
        snap = self.telemetry.snapshot(time.monotonic()).as_dict()
        sinks, failed = sorted(self.sinks.copy()), self.failed_sinks.copy()
        return {**snap, "sinks": sinks, "failed_sinks": failed, "fields": self._fields()}

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
                self._retry_sinks(now)
                self._check_limits(now)
                self.status.update(self.status_text(now), now)
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
        now = time.monotonic()
        snap = self.telemetry.snapshot(now)
        self.status.finish(
            f"{self.status_text(now)}  frames out {snap.frames_out} ({self.stopped_because})"
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
        is reported to the watchdog; a failure passes the frame through (never stops the
        thread), and a run of failures restarts the engine."""
        while not self._stop.is_set():
            frame = self.input.take(timeout=0.1)
            if frame is None:
                continue
            self.watchdog.started(time.monotonic())
            try:
                output = self.controller.process(frame, time.monotonic())
                fault = classify(self.controller.fault) if self.controller.fault else None
            except Exception as exc:  # a bug or an unwrapped error: same as a model failure
                output, fault = Output(frame.image, frame.captured_at, "pass"), classify(exc)
                if not self._engine_error_logged:
                    self.status.log(f"engine thread: {exc!r}; passing frames through")
                self._engine_error_logged = True
            else:
                self._engine_error_logged = False
            if self.watchdog.finished(time.monotonic(), fault):
                self.controller.restart_engine(f"{self.safety.restart_after} failures: {fault}")
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
        last: tuple[str, int] = ("engine", 0)
        while not self._stop.is_set():
            state, delay = pace(state, time.monotonic())
            if delay > 0 and self._stop.wait(delay):
                return
            output, version = self.output.peek()
            if output is None:
                return
            image, captured_at, shown = self._picture(output, version, time.monotonic())
            self._send(image)
            now = time.monotonic()
            fresh = captured_at is not None and shown != last
            self.telemetry.frame_out(now, now - captured_at if fresh else None)
            last = shown
            if self.limits.frames is not None and state.emitted >= self.limits.frames:
                self.request_stop(f"--frames {self.limits.frames}")
                return

    def _picture(
        self, output: Output, version: int, now: float
    ) -> tuple[Any, float | None, tuple[str, int]]:
        """What goes out this tick (see :func:`~broadcast_filter.runtime.watchdog.on_air`):
        the image, the capture time of what it shows (``None`` for the slate), and which
        picture it is (to tell a new frame from a repeat)."""
        pick, changed = self.watchdog.tick(
            now, input_age=now - self._last_input_at, source_lost=self._source_lost
        )
        if changed:
            self.telemetry.set_on_air(pick.kind, pick.reason, self.watchdog.state.switches)
            self.status.log(f"on air: {pick.kind}" + (f" ({pick.reason})" if pick.reason else ""))
        h, w = output.image.shape[:2]
        w, h = self.size or (w, h)
        if pick.kind == "slate":
            return no_signal_slate(w, h, pick.reason), None, ("slate", 0)
        if pick.kind in ("pass", "fade"):
            frame, frame_version = self.input.peek()
            if frame is not None:
                live = fit_image(frame.image, w, h)
                if pick.kind == "pass":
                    return live, frame.captured_at, ("pass", frame_version)
                image = blend(live, fit_image(output.image, w, h), pick.weight)
                return image, output.captured_at, ("fade", frame_version)
        return fit_image(output.image, w, h), output.captured_at, ("engine", version)

    def _send(self, image: Any) -> None:
        for name, sink in list(self.sinks.items()):
            try:
                sink.send(image)
            except Exception as exc:  # one sink's failure must not stop the others
                self.failed_sinks[name] = str(exc) or repr(exc)
                self._close_sink(name)
                left = ", ".join(self.sinks) or "none"
                retry = ""
                if self._reopen is not None:
                    self._retry[name] = (0, time.monotonic() + self.safety.sink_retry_s)
                    retry = f"; re-opening in {self.safety.sink_retry_s:g} s"
                self.status.log(f"sink {name} failed: {exc!r}{retry}; still sending to: {left}")
        if not self.sinks and self._reopen is None:
            self._fail("every sink failed")

    def _retry_sinks(self, now: float) -> None:
        """Re-open failed sinks whose backoff has run out (main thread: opening may block)."""
        for name, (attempt, due) in list(self._retry.items()):
            if now < due or self._reopen is None or self._stop.is_set():
                continue
            try:
                sink = self._reopen(name)
            except Exception as exc:  # still failing: wait longer, report
                s = self.safety
                delay = backoff_delay(attempt + 1, s.sink_retry_s, s.sink_retry_max_s)
                self._retry[name] = (attempt + 1, time.monotonic() + delay)
                self.failed_sinks[name] = str(exc) or repr(exc)
                self.status.log(f"sink {name}: re-open failed ({exc!r}); next try in {delay:g} s")
                continue
            del self._retry[name]
            self.failed_sinks.pop(name, None)
            self.sinks[name] = sink
            self.status.log(f"sink {name} re-opened after {attempt + 1} attempt(s)")

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
    """Open every sink, or none: on a failure the ones already open are closed again.
    Each is named by its URL with secrets masked (stream keys never reach the status line)."""
    from broadcast_filter.media.network import mask_url
    from broadcast_filter.media.open import open_sink

    opened: list[tuple[str, Sink]] = []
    try:
        for settings in sinks:
            sink = open_sink(settings.url, width=width, height=height, fps=fps, **settings.options)
            name = mask_url(settings.url)
            if any(name == n for n, _ in opened):
                name = f"{name} #{len(opened) + 1}"
            opened.append((name, sink))
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

    roots = [config.path.parent.resolve(), config.presets_folder]
    roots += [Path(config.model.cache_dir)] if config.model.cache_dir else []

    def load(settings: ModelSettings, chosen: Preset) -> Engine:
        check_preset_model(chosen.model, roots)  # ids and paths from a preset file
        return load_engine(settings, w, h, chosen, progress=False)

    check_preset_model(first.model, roots)
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
    urls = {name: settings for (name, _), settings in zip(sinks, config.sinks, strict=True)}

    def reopen(name: str) -> Sink:
        from broadcast_filter.media.open import open_sink

        url = urls[name]
        return open_sink(url.url, width=w, height=h, fps=config.fps, **url.options)

    daemon = Daemon(
        source,
        sinks,
        controller,
        telemetry,
        config.fps,
        limits=limits,
        status=status,
        safety=config.safety,
        reopen_sink=reopen,
    )
    if getattr(source, "state", None) is not None:  # network and NDI sources say how they are
        daemon.status_fields["source"] = lambda: source.state
    daemon.status_fields["config"] = config_watch(config.path, status.log)
    return daemon


def config_watch(path: Path, log: Callable[[str], None]) -> Callable[[], str | None]:
    """A status field that says when the daemon config changed on disk after the start:
    it is read once, so the change needs a restart (presets, by contrast, reload live)."""

    def mtime() -> float | None:
        try:
            return path.stat().st_mtime
        except OSError:
            return None

    started, told = mtime(), []

    def state() -> str | None:
        if mtime() == started:
            return None
        message = f"{path.name} changed on disk: restart to apply it"
        if not told:
            told.append(True)
            log(f"{path}: changed on disk; the daemon config is read at start, restart to apply it")
        return message

    return state
