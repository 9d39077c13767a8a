"""Building a daemon from a parsed config, top-down: presets, engine, sinks, source, the
daemon itself, then the OBS bridge (when the config has an ``obs:`` section).

The config was parsed and checked once (:func:`~broadcast_filter.control.config.load_config`);
everything here takes its parsed objects as they are.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from broadcast_filter.control import obs_bridge
from broadcast_filter.control.api import ApiServer
from broadcast_filter.control.config import (
    ConfigError,
    DaemonConfig,
    Issue,
    SinkSettings,
    UsageError,
    line_of,
)
from broadcast_filter.control.guard import check_preset_model
from broadcast_filter.control.obs_bridge import ObsBridge
from broadcast_filter.control.presets import Preset, PresetLibrary
from broadcast_filter.diffusion.spec import ModelSpec
from broadcast_filter.media.audio import CHANNELS, RATE
from broadcast_filter.media.base import Sink, Source
from broadcast_filter.media.network import mask_url
from broadcast_filter.media.open import open_sink, open_source
from broadcast_filter.runtime.batcher import Batcher
from broadcast_filter.runtime.controller import Controller
from broadcast_filter.runtime.daemon import Daemon, Limits
from broadcast_filter.runtime.engine import Engine, SharedModels, load_engine
from broadcast_filter.runtime.telemetry import StatusLine, Telemetry


def sink_options(settings: SinkSettings, audio: tuple[int, int] | None) -> dict[str, object]:
    """A sink's options: when the source may carry audio (``audio``: the format it opens
    in, ``(rate, channels)``), sinks that can carry it get an AAC track unless their options
    say ``audio: copy`` (the source's own AAC where it fits) or ``off``; otherwise none
    gets one."""
    if audio is None:
        return {**settings.options, "audio": "off"}
    return {"audio": "aac", **settings.options, "audio_format": audio}


def audio_format(source: Source) -> tuple[int, int] | None:
    """The format a daemon's audio opens in: the source's where it knows it when opened,
    48 kHz stereo where it may carry sound later; ``None`` for a source without sound."""
    if not source.carries_audio:
        return None
    return source.audio_format or (RATE, CHANNELS)


def open_sinks(
    sinks: Sequence[SinkSettings],
    width: int,
    height: int,
    fps: float,
    *,
    audio: tuple[int, int] | None = None,
) -> list[tuple[str, Sink]]:
    """Open every sink, or none: on a failure the ones already open are closed again.
    Each is named by its URL with secrets masked (stream keys never reach the status line).
    With ``audio`` (the source may carry sound, in this ``(rate, channels)``), sinks that
    can carry it get an audio track unless their options say ``audio: off``."""
    opened: list[tuple[str, Sink]] = []
    try:
        for settings in sinks:
            options = sink_options(settings, audio)
            sink = open_sink(settings.url, width=width, height=height, fps=fps, **options)
            name = mask_url(settings.url)
            if any(name == n for n, _ in opened):
                name = f"{name} #{len(opened) + 1}"
            opened.append((name, sink))
    except BaseException:
        for _, sink in opened:
            sink.close()
        raise
    return opened


def use_cpu_threads(threads: int, log: Callable[[str], None]) -> Callable[[], None]:
    """Give torch ``threads`` CPU threads (0: every core but one) while the daemon runs;
    returns what puts the previous count back. The core left over decodes, encodes and
    paces: on 2 cores, one torch thread styles the demo 1.4x faster than two, which fight
    the I/O threads for the second core (docs/benchmarks.md, issue 11)."""
    before = torch.get_num_threads()
    chosen = threads or max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(chosen)
    log(f"model on the CPU: {chosen} torch thread{'s' if chosen != 1 else ''}")
    return lambda: torch.set_num_threads(before)


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
    limits: Limits | None = None,
    status: StatusLine | None = None,
    progress: bool = True,
    shared: tuple[SharedModels, Batcher] | None = None,
) -> Daemon:
    """Load presets and model (with progress bars), open sinks, then the source. With
    ``shared``, the model comes from (and stays in) those shared models and every model call
    goes through the batcher, shared with the other streams built on them.

    Raises :class:`ConfigError` (exit 2), or :class:`MediaError` / model errors (exit 1).
    """
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

    def engine_for(spec: ModelSpec, chosen: Preset, progress: bool) -> Engine:
        if shared is None:
            engine = load_engine(spec, w, h, chosen, progress=progress)
        else:
            pool, batcher = shared
            models, generation = pool.get(spec, progress=progress)
            engine = load_engine(
                spec, w, h, chosen, progress=False, models=models, runner=batcher.drive
            )
            engine.generation = generation
        models = engine.pipe.models
        status.log(f"model {models.name}: {models.dtype_reason}")
        return engine

    def load(spec: ModelSpec, chosen: Preset) -> Engine:
        check_preset_model(chosen.model, roots)  # ids and paths from a preset file
        return engine_for(spec, chosen, progress=False)

    check_preset_model(first.model, roots)
    engine = engine_for(first.model_spec(config.model), first, progress)
    controller = Controller(
        library,
        first,
        engine,
        config.model,
        load,
        telemetry,
        status.log,
        on_restart=shared[0].drop if shared else lambda engine: None,
    )
    telemetry.set_state(preset=first.name, mode="starting", bypass=False)
    src = config.source
    source = open_source(src.url, width=w, height=h, fps=config.fps, fit=src.fit, **src.options)
    audio = audio_format(source)
    try:
        sinks = open_sinks(config.sinks, w, h, config.fps, audio=audio)
    except BaseException:
        source.close()
        raise
    urls = {name: settings for (name, _), settings in zip(sinks, config.sinks, strict=True)}

    def reopen(name: str) -> Sink:
        url = urls[name]
        return open_sink(url.url, width=w, height=h, fps=config.fps, **sink_options(url, audio))

    daemon = Daemon(
        source,
        sinks,
        controller,
        telemetry,
        config.fps,
        limits=limits or Limits(),
        status=status,
        safety=config.safety,
        reopen_sink=reopen,
        name=config.name,
    )
    if engine.pipe.device.type == "cpu":
        restore = use_cpu_threads(config.cpu_threads, status.log)
        daemon.on_stop.append(restore)
    if getattr(source, "state", None) is not None:  # network and NDI sources say how they are
        daemon.status_fields["source"] = lambda: source.state
    daemon.status_fields["config"] = config_watch(config.path, status.log)
    return daemon


def run_daemon(
    config: DaemonConfig,
    *,
    preset: str | None = None,
    limits: Limits | None = None,
    status: StatusLine | None = None,
) -> int:
    """``broadcast-filter run``: build the daemon, start its OBS bridge, run until stopped;
    return the exit code."""
    daemon = build_daemon(config, preset=preset, limits=limits, status=status)
    try:
        start_api(config, daemon)
    except BaseException:
        daemon.stop()
        raise
    start_obs_bridge(config, daemon)
    return daemon.run()


def start_api(config: DaemonConfig, daemon: Daemon) -> ApiServer | None:
    """With an ``api:`` section, serve the HTTP/WebSocket API and the dock on the daemon's
    controller: every logged line becomes a WebSocket event, the status line shows the
    dock's URL (``api http://...``, never the token), and the server stops with the daemon.
    Raises ``OSError`` naming ``api.bind``/``api.port`` when it cannot listen."""
    if config.api is None:
        return None
    server = ApiServer(config.api, daemon.controller, daemon.status.log).start()
    daemon.status.listeners.append(server.publish)
    shown = replace(config.api, token="").url(server.port)
    daemon.status.log(
        f"api: dock and API on {shown}" + (" (token required)" if config.api.token else "")
    )
    daemon.on_stop.append(lambda: server.stop(timeout=0.5))
    return server


def start_obs_bridge(config: DaemonConfig, daemon: Daemon) -> ObsBridge | None:
    """With an ``obs:`` section, start the OBS bridge on the daemon's controller, show its
    state on the status line (``obs connected``, ``obs connected, Mic/Aux sync +420 ms``)
    and stop it when the daemon stops. Its ``sync_audio`` inputs follow the daemon's
    lasting video delay."""
    if config.obs is None:
        return None
    bridge = ObsBridge(config.obs, daemon.controller, delay=lambda: daemon.delay.delay)
    daemon.status_fields["obs"] = lambda: bridge.text
    stop_s = 2.0 if config.obs.sync_audio else 0.5  # time to put the offsets back first
    handler = LogLines(daemon.status.log, "obs: ")
    logger = logging.getLogger(obs_bridge.__name__)
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)

    def stop() -> None:
        bridge.stop(timeout=stop_s)
        logger.removeHandler(handler)

    daemon.on_stop.append(stop)
    return bridge.start()


class LogLines(logging.Handler):
    """Log records as one line each on the daemon's log (stderr, and the API's WebSocket
    events): OBS connected or lost, a scene or hotkey item applied, a CustomEvent."""

    def __init__(self, log: Callable[[str], None], prefix: str) -> None:
        super().__init__(logging.INFO)
        self.log, self.prefix = log, prefix

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.log(self.prefix + record.getMessage())
        except Exception:
            self.handleError(record)


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
