"""Run the real daemon in-process for daemon-level tests: the same ``build_daemon`` and
``start_obs_bridge`` that ``broadcast-filter run`` uses, a recording sink registered as a
sink kind (so the builder opens it from the config like any other), and output counting
in time windows.

The offline ``tiny`` model at a small size with ``cfg_type: none`` keeps up on a 2-core CPU;
the ``passthrough`` preset (engine bypassed) lets a pixel counter survive to the output.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import peers
import yaml

from broadcast_filter.control.config import load_config
from broadcast_filter.media.base import Sink, audio_track, register_sink
from broadcast_filter.media.sources import read_counter
from broadcast_filter.runtime.build import build_daemon, start_api, start_obs_bridge
from broadcast_filter.runtime.daemon import Daemon
from broadcast_filter.runtime.telemetry import StatusLine

RECORD = "bf-record"
STYLE = {
    "cfg_type": "none",
    "guidance_scale": 1.0,
    "t_index_list": [40],
    "ssf": {"enabled": False},
    "transition": 0,
}
PRESETS = {
    "warm": {"prompt": "warm sunset colours", **STYLE},
    "cool": {"prompt": "cool blue night", **STYLE},
    "passthrough": {"bypass": True, "transition": 0},
}


def _stamp(image: np.ndarray) -> int | None:
    found = peers.read_stamp(image)
    return None if found is None else found[0]


#: what a recording sink reads from each frame (sink option ``reader``)
READERS: dict[str, Callable[[np.ndarray], Any]] = {
    "none": lambda image: None,
    "stamp": _stamp,  # tests/peers.py stamp (publishers): the counter
    "counter": read_counter,  # the test pattern's frame counter
}


class RecordingSink(Sink):
    """Keeps the send time of every frame and what its ``reader`` finds in it (a stamp or
    counter). The newest instance is :attr:`RecordingSink.last`."""

    kind = RECORD
    last: RecordingSink | None = None

    def __init__(
        self,
        url: str,
        *,
        width: int,
        height: int,
        fps: float,
        reader: str = "none",
        audio: str = "off",
        audio_format: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(width=width, height=height, fps=fps)
        self.audio = audio_track(audio, url)  # the sound itself is not recorded
        self.reader = READERS[reader]
        self.lock = threading.Lock()
        self.times: list[float] = []
        self.found: list[Any] = []
        RecordingSink.last = self

    def send(self, image: np.ndarray, at: float | None = None) -> None:
        found = self.reader(image)
        with self.lock:
            self.times.append(time.monotonic())
            self.found.append(found)

    def since(self, t: float) -> list[tuple[float, Any]]:
        with self.lock:
            return [(a, f) for a, f in zip(self.times, self.found, strict=True) if a >= t]

    def count_between(self, t0: float, t1: float) -> int:
        with self.lock:
            return sum(t0 <= t < t1 for t in self.times)


register_sink(RECORD, RecordingSink)


def write_config(
    folder: Path,
    *,
    source: str,
    sinks: list[Any],
    size: tuple[int, int],
    fps: float,
    start: str,
    cache_dir: str,
    obs: dict[str, Any] | None = None,
    api: dict[str, Any] | None = None,
    source_options: dict[str, Any] | None = None,
) -> Path:
    """A daemon config plus the test presets in ``folder``; returns the config's path."""
    presets = folder / "presets"
    presets.mkdir(parents=True, exist_ok=True)
    for name, body in PRESETS.items():
        (presets / f"{name}.yaml").write_text(yaml.safe_dump(body))
    config: dict[str, Any] = {
        "model": {"id": "tiny", "device": "cpu", "cache_dir": cache_dir},
        "resolution": list(size),
        "fps": fps,
        "source": {"url": source, **({"options": source_options} if source_options else {})},
        "sinks": sinks,
        "presets": {"folder": "presets", "start": start},
    }
    if obs is not None:
        config["obs"] = obs
    if api is not None:
        config["api"] = api
    path = folder / "daemon.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


DEMO_PRESETS = Path(__file__).resolve().parents[1] / "configs" / "demo_presets"


def demo_config(
    folder: Path,
    *,
    source: str,
    sinks: list[Any],
    start: str,
    size: tuple[int, int] = (128, 128),
    fps: float = 15,
) -> Path:
    """A daemon config on the demo model (trained here: it draws what it is given) with the
    demo presets, SSF off (every frame goes through the model), at the demo's size."""
    presets = folder / "presets"
    presets.mkdir(parents=True, exist_ok=True)
    for path in DEMO_PRESETS.glob("*.yaml"):
        preset = yaml.safe_load(path.read_text())
        if "ssf" in preset:
            preset["ssf"] = {"enabled": False}
        (presets / path.name).write_text(yaml.safe_dump(preset))
    config = {
        "model": {"id": "demo", "taesd": "demo", "device": "cpu"},
        "resolution": list(size),
        "fps": fps,
        "source": {"url": source},
        "sinks": sinks,
        "presets": {"folder": "presets", "start": start},
    }
    path = folder / "daemon.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Lines:
    """A text stream for the status line that keeps every line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.lines.extend(line for line in text.splitlines() if line.strip())

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def running(config_path: Path) -> Iterator[tuple[Daemon, Any, Lines]]:
    """Build the daemon from ``config_path`` as ``run`` does, start its API (``api:``) and
    OBS bridge (``obs:``), run it in a thread; stop all on exit. The API server, if any, is
    ``daemon.api`` here (tests only)."""
    config = load_config(config_path)
    lines = Lines()
    daemon = build_daemon(config, status=StatusLine(lines, interval=0.5), progress=False)
    try:
        daemon.api = start_api(config, daemon)  # type: ignore[attr-defined]
    except BaseException:
        daemon.stop()
        raise
    bridge = start_obs_bridge(config, daemon)
    thread = threading.Thread(target=daemon.run, name="daemon-main", daemon=True)
    thread.start()
    try:
        yield daemon, bridge, lines
    finally:
        daemon.request_stop("test over")
        thread.join(15)  # the daemon's stop stops the bridge too
        assert not thread.is_alive(), "the daemon did not stop"


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def window_counts(sink: RecordingSink, t0: float, t1: float, width: float = 0.5) -> list[int]:
    """Frames the sink got in each whole ``width``-second window of ``[t0, t1)``."""
    count = int((t1 - t0) // width)
    return [sink.count_between(t0 + i * width, t0 + (i + 1) * width) for i in range(count)]


def frames_out_windows(daemon: Daemon, seconds: float, width: float = 0.5) -> list[int]:
    """The daemon's own output counter (telemetry ``frames_out``), sampled per window for
    ``seconds``: how many frames it sent in each window."""
    counts, last = [], daemon.stats()["frames_out"]
    start = time.monotonic()
    for i in range(int(seconds // width)):
        time.sleep(max(0.0, start + (i + 1) * width - time.monotonic()))
        now = daemon.stats()["frames_out"]
        counts.append(now - last)
        last = now
    return counts
