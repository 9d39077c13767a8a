"""Several streams in one process on one model (a config with ``streams:``).

Each stream is a whole :class:`~broadcast_filter.runtime.daemon.Daemon` — its own source,
sinks, presets, controller, watchdog, output pacing, OBS bridge and API — so a lost source,
a failed sink or a broken preset stays that stream's business. The streams share the loaded
models (:class:`~broadcast_filter.runtime.engine.SharedModels`) and their model calls
(:class:`~broadcast_filter.runtime.batcher.Batcher`: one UNet call for every stream that has
a new frame). The main thread does every daemon's chores and draws one status line for all.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping, Sequence

from broadcast_filter.control.api import ApiServer
from broadcast_filter.control.config import DaemonConfig
from broadcast_filter.runtime.batcher import Batcher
from broadcast_filter.runtime.build import build_daemon, start_api, start_obs_bridge
from broadcast_filter.runtime.daemon import Daemon, Limits, install_signals
from broadcast_filter.runtime.engine import SharedModels
from broadcast_filter.runtime.telemetry import StatusLine


class StreamStatus(StatusLine):
    """One stream's side of the shared status line: its log lines carry its name (and go to
    its own listeners, e.g. its API's events); the site draws the status line itself."""

    def __init__(self, shared: StatusLine, name: str) -> None:
        super().__init__(shared.stream)
        self.shared, self.name = shared, name

    def log(self, message: str) -> None:
        self.shared.log("\n".join(f"{self.name}: {line}" for line in message.splitlines()))
        for listener in list(self.listeners):
            with contextlib.suppress(Exception):  # a broken listener must not break logging
                listener(message)

    def update(self, text: str, now: float) -> None:
        """Nothing: :meth:`Site.status_text` shows every stream on one line."""

    def finish(self, text: str) -> None:
        self.shared.log(f"{self.name}: {text}")


class Site:
    """The streams' daemons, run together until every one has stopped."""

    def __init__(
        self,
        daemons: Sequence[Daemon],
        batcher: Batcher,
        status: StatusLine,
        apis: Mapping[str, ApiServer] | None = None,
    ) -> None:
        """``apis``: each stream's API server by stream name (streams with ``api:``)."""
        self.daemons, self.batcher, self.status = list(daemons), batcher, status
        self.apis = dict(apis or {})
        self._stop = threading.Event()
        for daemon in self.daemons:
            daemon.status_fields["pace"] = self._pace_of(daemon)

    def _pace_of(self, daemon: Daemon):
        def pace() -> str | None:
            snap = daemon.telemetry.snapshot(time.monotonic())
            if not snap.below_target:
                return None
            return f"below target ({snap.fps_engine:.1f} of {snap.target_fps:g} fps styled)"

        return pace

    def request_stop(self, reason: str) -> None:
        for daemon in self.daemons:
            daemon.request_stop(reason)
        self._stop.set()

    def status_text(self, now: float) -> str:
        """One line: each stream's preset, mode, rates and fields (source, sinks, API,
        pace); steps per round of shared model calls; the streams below their target."""
        parts, slow = [], []
        for daemon in self.daemons:
            s = daemon.telemetry.snapshot(now)
            state = "stopped" if daemon.stopping else f"{s.preset or '-'} | {s.mode}"
            fields = "".join(f"  {k} {v}" for k, v in daemon.details()["fields"].items())
            parts.append(
                f"{daemon.name} [{state}] model {s.fps_model:.1f} "
                f"out {s.fps_out:.1f}/{s.target_fps:g} fps{fields}"
            )
            if s.below_target and not daemon.stopping:
                slow.append(daemon.name)
        stats = self.batcher.stats
        text = "  |  ".join(parts) + f"  ||  {stats.streams_per_round:.1f} streams per round"
        return text + (f"  below target: {', '.join(slow)}" if slow else "")

    def run(self) -> int:
        """Run every stream until all have stopped (a signal stops them all); the exit code
        is 1 if any stream stopped on a failure."""
        restore = install_signals(self.request_stop)
        try:
            for daemon in self.daemons:
                daemon.start()
            while not self._stop.wait(0.1):
                now = time.monotonic()
                running = [d for d in self.daemons if not d.stopping]
                for daemon in running:
                    daemon.poll(now)
                for daemon in running:
                    if daemon.stopping:
                        daemon.stop()
                if all(d.stopping for d in self.daemons):
                    break
                self.status.update(self.status_text(now), now)
        finally:
            for daemon in self.daemons:
                daemon.stop()
            restore()
        return 1 if any(d.failure for d in self.daemons) else 0


def build_site(
    config: DaemonConfig,
    *,
    preset: str | None = None,
    limits: Limits | None = None,
    status: StatusLine,
) -> Site:
    """A daemon per stream of ``config`` on shared models and one batcher, each with its API
    and OBS bridge when its stream has them. On a failure the ones built are stopped."""
    pool, batcher = SharedModels(), Batcher(config.batch_window_ms / 1000)
    daemons: list[Daemon] = []
    apis: dict[str, ApiServer] = {}
    try:
        for i, stream in enumerate(config.stream_configs()):
            daemon = build_daemon(
                stream,
                preset=preset,
                limits=limits,
                status=StreamStatus(status, stream.name),
                progress=i == 0,
                shared=(pool, batcher),
            )
            daemons.append(daemon)
            server = start_api(stream, daemon)
            if server is not None:
                apis[stream.name] = server
            start_obs_bridge(stream, daemon)
    except BaseException:
        for daemon in daemons:
            daemon.stop()
        raise
    return Site(daemons, batcher, status, apis)
