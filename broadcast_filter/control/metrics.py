"""``/metrics``: the daemon's status in the Prometheus exposition format (prometheus_client).

Built from one ``Commands.status()`` snapshot per scrape, in a registry of its own (nothing
global): counters are the daemon's own frame counters, so they move with the frames.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from broadcast_filter.runtime.watchdog import ON_AIR_KINDS

PREFIX = "broadcast_filter"
COUNTERS = (
    ("frames_in", "frames_in", "frames captured from the source"),
    ("frames_model", "frames_model", "frames the model ran on"),
    ("frames_skipped", "frames_skipped", "frames the similarity filter skipped"),
    ("frames_out", "frames_out", "frames sent to the sinks"),
    ("frames_repeated", "frames_repeated", "output frames that repeated the previous one"),
    ("frames_dropped", "dropped", "captured frames dropped before the engine took them"),
    ("engine_restarts", "engine_restarts", "engine rebuilds after failures in a row"),
    ("mode_switches", "mode_switches", "changes of what is on air"),
)


def _number(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else math.nan


class StatusCollector:
    """Metric families from one status snapshot."""

    def __init__(self, status: Mapping[str, Any]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status
        for name, key, help in COUNTERS:
            if key in s:
                yield CounterMetricFamily(f"{PREFIX}_{name}", help, value=_number(s[key]))
        fps = GaugeMetricFamily(f"{PREFIX}_fps", "frames per second", labels=["stage"])
        for stage in ("in", "model", "out"):
            fps.add_metric([stage], _number(s.get(f"fps_{stage}")))
        yield fps
        yield GaugeMetricFamily(
            f"{PREFIX}_target_fps", "output frame rate asked for", _number(s.get("target_fps"))
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_skip_ratio", "share of frames skipped", _number(s.get("skip_ratio"))
        )
        hist = s.get("latency_histogram")
        if hist:
            bounds = [*(f"{b:g}" for b in hist["buckets_s"]), "+Inf"]
            yield HistogramMetricFamily(
                f"{PREFIX}_latency_seconds",
                "capture-to-sink latency of each new output frame",
                buckets=list(zip(bounds, (float(c) for c in hist["counts"]), strict=True)),
                sum_value=float(hist["sum_s"]),
            )
        on_air = GaugeMetricFamily(
            f"{PREFIX}_on_air", "what the output sends (1 for the current kind)", labels=["kind"]
        )
        for kind in ON_AIR_KINDS:
            on_air.add_metric([kind], 1.0 if s.get("on_air") == kind else 0.0)
        yield on_air
        yield GaugeMetricFamily(
            f"{PREFIX}_bypass", "bypass switched on", float(bool(s.get("bypass")))
        )
        preset = GaugeMetricFamily(f"{PREFIX}_preset", "the preset on air", labels=["preset"])
        preset.add_metric([str(s.get("preset", ""))], 1.0)
        yield preset
        if "source_up" in s:
            yield GaugeMetricFamily(
                f"{PREFIX}_source_up", "the source delivers frames", float(bool(s["source_up"]))
            )
        if "sinks" in s:
            up = GaugeMetricFamily(f"{PREFIX}_sink_up", "a sink is open", labels=["sink"])
            for name in s["sinks"]:
                up.add_metric([name], 1.0)
            for name in s.get("failed_sinks", {}):
                if name not in s["sinks"]:
                    up.add_metric([name], 0.0)
            yield up
        audio = s.get("audio")
        if audio and audio.get("delay_s") is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_audio_delay_seconds",
                "how long the audio is held back to meet its video",
                _number(audio["delay_s"]),
            )
            yield CounterMetricFamily(
                f"{PREFIX}_audio_silence_seconds",
                "silence put on air for want of source audio",
                value=_number(audio["silence_s"]),
            )
            yield CounterMetricFamily(
                f"{PREFIX}_audio_off_sync_frames",
                "fresh frames whose events may meet their sound outside broadcast tolerance",
                value=_number(audio["off_sync_frames"]),
            )
        health = s.get("health")
        if health:
            yield GaugeMetricFamily(f"{PREFIX}_ready", "first output sent", float(health["ready"]))
            yield GaugeMetricFamily(
                f"{PREFIX}_healthy", "output flowing to a sink", float(health["healthy"])
            )


class StreamLabel:
    """Another collector's metrics, each sample labelled ``stream="<name>"`` (a daemon that
    serves several streams: one scrape target per stream's API, told apart by the label)."""

    def __init__(self, inner: StatusCollector, stream: str) -> None:
        self.inner, self.stream = inner, stream

    def collect(self) -> Iterator[Metric]:
        for metric in self.inner.collect():
            metric.samples = [
                s._replace(labels={"stream": self.stream, **s.labels}) for s in metric.samples
            ]
            yield metric


def metrics_text(status: Mapping[str, Any]) -> bytes:
    """The exposition text of one status snapshot (labelled with its stream, if any)."""
    registry = CollectorRegistry(auto_describe=False)
    collector = StatusCollector(status)
    registry.register(StreamLabel(collector, status["stream"]) if "stream" in status else collector)
    return generate_latest(registry)
