"""Several streams in one daemon (``streams:``): the config, fault isolation in a soak on the
real tiny model with the real batcher, per-stream API and metrics, and two real sources to
two real outputs through ``broadcast-filter run``, decoded by independent PyAV readers.

Rates are judged by output counts per 1 s window (at least one frame in each: the output
never stops) and by totals, never by single-frame timings.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import peers
import pytest
import yaml
from conftest import require_tool
from daemon_harness import PRESETS, Lines, RecordingSink, wait_for, window_counts

from broadcast_filter.control.config import ConfigError, load_config
from broadcast_filter.media.base import Frame, Source, SourceLost, register_sink, register_source
from broadcast_filter.runtime.telemetry import StatusLine

ROOT = Path(__file__).resolve().parents[1]
PEERS = str(Path(__file__).with_name("peers.py"))


def write_streams(folder: Path, streams: list[dict[str, Any]], cache_dir: str, **top) -> Path:
    """A multi-stream config; each stream gets its own presets folder (the test presets)."""
    for stream in streams:
        presets = folder / f"presets_{stream['name']}"
        presets.mkdir(parents=True, exist_ok=True)
        for name, body in PRESETS.items():
            (presets / f"{name}.yaml").write_text(yaml.safe_dump(body))
        stream.setdefault("presets", {"folder": presets.name, "start": "warm"})
    config = {
        "model": {"id": "tiny", "device": "cpu", "cache_dir": cache_dir},
        "resolution": [64, 64],
        "fps": 10,
        **top,
        "streams": streams,
    }
    path = folder / "streams.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- config


def test_streams_share_the_top_level_model_size_and_rate_unless_they_override(tmp_path):
    path = write_streams(
        tmp_path,
        [
            {"name": "a", "source": {"url": "testsrc"}, "sinks": ["null"]},
            {
                "name": "b",
                "source": {"url": "testsrc"},
                "sinks": ["null"],
                "resolution": [128, 64],
                "fps": 25,
                "model": {"taesd": "./taesd"},
            },
        ],
        "/cache",
    )
    a, b = load_config(path).stream_configs()
    assert (a.name, a.resolution, a.fps, a.model.taesd) == ("a", (64, 64), 10, None)
    assert (b.name, b.resolution, b.fps) == ("b", (128, 64), 25)
    assert b.model.taesd == str(tmp_path / "taesd")  # resolved against the config's folder
    assert b.model.id == a.model.id == "tiny" and b.model.cache_dir == "/cache"
    assert a.presets_folder == tmp_path / "presets_a" and not a.streams


def test_single_stream_configs_are_their_own_only_stream(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text("model: {id: tiny}\nsinks: [null]\n")
    config = load_config(path)
    assert config.stream_configs() == [config] and config.name == ""


@pytest.mark.parametrize(
    "body, line, field, words",
    [
        ("sinks: [null]\nstreams:\n  - {name: a, sinks: [null]}\n", 2, "sinks", "per stream"),
        (
            "streams:\n  - {name: a, sinks: [null]}\n  - {name: a, sinks: [null]}\n",
            2,
            "streams",
            "'a' given twice",
        ),
        ("streams:\n  - {name: a}\n", 3, "streams[0].sinks", "missing required field"),
        (
            "streams:\n  - {name: a, sinks: [null], api: {port: 8800}}\n"
            "  - {name: b, sinks: [null], api: {port: 8800}}\n",
            2,
            "streams",
            "8800 given to two streams",
        ),
        ("streams:\n  - {name: a, sinks: [null], fps: 0}\n", 3, "streams[0].fps", ">= 1"),
        ("source: {url: testsrc}\n", 1, "sinks", "missing required field"),
    ],
)
def test_stream_config_errors_name_the_line_and_field(tmp_path, body, line, field, words):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {id: tiny}\n" + body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert f"{path}:{line}: {field}: " in text and words in text, text


def test_run_refuses_source_and_output_flags_with_streams(tmp_path):
    path = write_streams(tmp_path, [{"name": "a", "sinks": ["null"]}], "/cache")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "broadcast_filter.cli",
            "run",
            "--config",
            str(path),
            "--output",
            "null",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=120,
    )
    assert run.returncode == 2 and "has streams:" in run.stderr, run.stderr


# ----------------------------------------------------------------------------- soak


class TaggedSink(RecordingSink):
    """A recording sink per stream (option ``tag``); ``fail_at`` makes the first of a tag
    raise once, on that frame, the way a full disk does. In-process so the test can count
    every frame."""

    kind = "bf-tagged"
    by_tag: ClassVar[dict[str, list[TaggedSink]]] = {}

    def __init__(self, url: str, *, tag: str, fail_at: int = 0, **kw) -> None:
        super().__init__(url, **kw)
        self.fail_at = 0 if TaggedSink.by_tag.get(tag) else fail_at  # a re-opened one works
        self.sent = 0
        TaggedSink.by_tag.setdefault(tag, []).append(self)

    def send(self, image: np.ndarray, at: float | None = None) -> None:
        self.sent += 1
        if self.sent == self.fail_at:
            raise OSError(28, "No space left on device")
        super().send(image, at)
        self.last_image = image


class DroppingSource(Source):
    """A live source that goes silent and drops (``SourceLost``) every ``every`` frames and
    comes back on the next ``frames()`` call. A fake because the test is about the other
    streams during the loss; real network loss is in tests/test_daemon_network.py."""

    kind = "bf-dropping"
    drops = 0

    def __init__(self, url: str, every: int = 40) -> None:
        self.every, self.index = every, 0

    def frames(self) -> Iterator[Frame]:
        for _ in range(self.every):
            time.sleep(0.1)
            self.index += 1
            image = np.full((64, 64, 3), (self.index * 7) % 256, np.uint8)
            yield Frame(image, time.monotonic(), self.index)
        time.sleep(1.5)  # silent beyond the hold time, then the loss is noticed
        DroppingSource.drops += 1
        raise SourceLost("publisher went away")


register_sink(TaggedSink.kind, TaggedSink)
register_source(DroppingSource.kind, DroppingSource)


def tagged(tag: str, **options) -> dict[str, Any]:
    return {"url": "bf-tagged", "options": {"tag": tag, **options}}


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@pytest.mark.slow
def test_one_streams_faults_leave_the_others_styled_and_every_output_keeps_its_rate(
    tmp_path, model_cache
):
    from broadcast_filter.runtime.site import build_site

    TaggedSink.by_tag.clear()
    safety = {"restart_after": 3, "sink_retry_s": 0.3, "hold_s": 0.5, "stall_s": 3.0}
    path = write_streams(
        tmp_path,
        [
            {"name": "drop", "source": {"url": "bf-dropping"}, "sinks": [tagged("drop")]},
            {
                "name": "sinkfail",
                "source": {"url": "testsrc"},
                "sinks": [tagged("sinkfail"), tagged("flaky", fail_at=30)],
                "api": {"port": 0},
            },
            {
                "name": "broken",
                "source": {"url": "testsrc"},
                "sinks": [tagged("broken")],
                "api": {"port": 0},
            },
        ],
        model_cache,
        safety=safety,
    )
    config = load_config(path)
    lines = Lines()
    site = build_site(config, status=StatusLine(lines, interval=0.5))
    runner = threading.Thread(target=site.run, name="site", daemon=True)
    t0 = time.monotonic()
    runner.start()
    by_name = {d.name: d for d in site.daemons}

    def styled(name: str) -> bool:
        return by_name[name].stats()["mode"] == "styled"

    def text() -> str:
        return "\n".join(lines.lines)

    try:
        wait_for("every stream styled", lambda: all(styled(n) for n in by_name), 120)
        t_styled = time.monotonic()
        # 1. the drop stream's source goes away: the others stay styled meanwhile
        wait_for("the drop stream's source lost", lambda: "drop: source lost" in text(), 60)
        assert styled("sinkfail") and styled("broken")
        # 2. the sinkfail stream's second sink failed (frame 30) and is re-opened
        wait_for(
            "the flaky sink re-opened",
            lambda: "sinkfail: sink bf-tagged" in text() and "re-opened after" in text(),
            60,
        )
        # 3. the broken stream's active preset is broken on disk: it keeps its look
        (tmp_path / "presets_broken" / "warm.yaml").write_text("prompt: [unclosed\n")
        wait_for(
            "the broken preset reported", lambda: "broken: " in text() and "warm.yaml" in text(), 30
        )
        assert styled("broken") and by_name["broken"].stats()["preset"] == "warm"
        # 4. a model fault: the shared UNet fails until the model is reloaded
        unet = by_name["broken"].controller.engine.pipe.models.unet

        def fault(module, args):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        hook = unet.register_forward_pre_hook(fault)
        fault_at = time.monotonic()
        wait_for("the streams restarted", lambda: text().count("restarting the engine") >= 2, 60)
        wait_for(
            "every stream styled again",
            lambda: all(
                styled(n)
                and by_name[n].controller.engine is not None
                and by_name[n].controller.engine.generation == 2
                for n in ("sinkfail", "broken")
            ),
            120,
        )
        hook.remove()
        recovered_at = time.monotonic()
        time.sleep(2.0)
        # per-stream API and metrics
        for name in ("sinkfail", "broken"):
            port = site.apis[name].port
            status = get_json(f"http://127.0.0.1:{port}/api/status")
            assert status["stream"] == name and status["preset"] == "warm"
            metrics = get_text(f"http://127.0.0.1:{port}/metrics")
            assert f'broadcast_filter_frames_out_total{{stream="{name}"}}' in metrics
        t1 = time.monotonic()
    finally:
        site.request_stop("test over")
        runner.join(20)
    assert not runner.is_alive()
    print(f"\nmulti-stream soak {t1 - t0:.0f} s; {site.batcher.stats}")
    generations = {d.name: d.controller.engine.generation for d in site.daemons}
    assert generations["sinkfail"] == generations["broken"] == 2  # reloaded once for all
    for tag in ("drop", "sinkfail", "broken"):
        (sink,) = TaggedSink.by_tag[tag]
        counts = window_counts(sink, t_styled, t1, width=1.0)
        print(f"{tag}: {len(sink.times)} frames out, per 1 s window {counts}")
        assert min(counts) >= 1, (tag, counts)  # the output never stopped
        fault_counts = window_counts(sink, fault_at, recovered_at, width=1.0)
        assert not fault_counts or min(fault_counts) >= 1, (tag, fault_counts)
        assert sum(counts) >= 0.5 * 10 * len(counts), (tag, counts)  # its own rate, roughly
    assert len(TaggedSink.by_tag["flaky"]) == 2  # failed once, re-opened once
    assert DroppingSource.drops >= 1
    assert "drop: source is back" in text()
    for line in lines.lines:  # every logged line names its stream
        if "frames out" in line or "||" in line:
            continue
        assert line.split(":")[0] in by_name, line


# ----------------------------------------------------------------------------- real peers

FPS = 15
SIZE = (256, 96)  # the stamp's 72 blocks of 16 px need 256 x 80


@pytest.mark.slow
@pytest.mark.peers
def test_two_real_sources_to_two_real_outputs_through_one_daemon(tmp_path, model_cache):
    """An RTMP publisher and a test pattern in, two UDP/MPEG-TS outputs out, each read back
    by its own PyAV reader process: each output carries its own stream, in order."""
    require_tool("ffmpeg")
    rtmp = f"rtmp://127.0.0.1:{peers.free_port()}/live/cam"
    out_cam, out_pattern = (f"udp://127.0.0.1:{peers.free_port(socket.SOCK_DGRAM)}" for _ in "ab")
    path = write_streams(
        tmp_path,
        [
            {
                "name": "cam",
                "source": {"url": f"{rtmp}?listen=1"},
                "sinks": [out_cam],
                "presets": {"folder": "presets_cam", "start": "passthrough"},
            },
            {"name": "pattern", "source": {"url": "testsrc"}, "sinks": [out_pattern]},
        ],
        model_cache,
        resolution=list(SIZE),
        fps=FPS,
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    log = (tmp_path / "run.log").open("w+")
    argv = [sys.executable, "-m", "broadcast_filter.cli", "run", "--config", str(path)]
    daemon = peers.spawn(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)

    def logged() -> str:
        log.seek(0)
        return log.read()

    try:
        wait_for("the cam stream's listener", lambda: "waiting for publisher" in logged(), 120)
        publish = [
            sys.executable,
            PEERS,
            "publish",
            "--url",
            rtmp,
            "--format",
            "flv",
            "--fps",
            str(FPS),
            "--size",
            f"{SIZE[0]}x{SIZE[1]}",
            "--frames",
            "1800",
        ]
        peers.spawn(publish, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("the cam stream's source live", lambda: "source live" in logged(), 90)
        readers = [
            subprocess.Popen(
                [
                    sys.executable,
                    PEERS,
                    "read",
                    "--url",
                    url,
                    "--format",
                    "mpegts",
                    "--seconds",
                    "8",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for url in (out_cam, out_pattern)
        ]
        got = [json.loads(r.communicate(timeout=90)[0]) for r in readers]
    finally:
        daemon.send_signal(2)
        code = daemon.wait(30)
        peers.stop_all()
    cam, pattern = got
    print(
        f"\ncam: {len(cam['counters'])} stamped frames {cam['counters'][:3]}.."
        f"{cam['counters'][-3:]}; pattern: {pattern['frames']} frames, "
        f"{len(pattern['counters'])} stamped"
    )
    assert code == 0, logged()[-2000:]
    assert cam["sizes"] == [list(SIZE)]  # (sizes are of stamped frames only)
    # the publisher's frames reach the cam output only, in order (repeats allowed)
    assert len(set(cam["counters"])) >= FPS and cam["counters"] == sorted(cam["counters"])
    assert pattern["frames"] >= FPS and not pattern["counters"]


# ----------------------------------------------------------------------------- pace


@pytest.mark.parametrize(
    "mode, in_every, handled_every, skipped, below",
    [
        ("styled", 1, 2, False, True),  # the model styles every second frame: too slow
        ("styled", 1, 1, False, False),
        ("styled", 1, 1, True, False),  # SSF skips are frames the engine handled in time
        ("styled", 2, 2, False, False),  # the source gives only half the rate: not our fault
        ("passthrough", 1, 4, False, False),
    ],
)
def test_a_stream_is_below_target_when_its_engine_handles_fewer_frames_than_it_gets(
    mode, in_every, handled_every, skipped, below
):
    from broadcast_filter.runtime.telemetry import Telemetry

    telemetry = Telemetry(target_fps=10)
    telemetry.set_state(preset="warm", mode=mode, bypass=False)
    for k in range(40):  # 4 s at 10 ticks a second
        now = k / 10
        if k % in_every == 0:
            telemetry.frame_in(now, 0)
        if k % handled_every == 0:
            telemetry.model_step(now, skipped)
    assert telemetry.snapshot(3.95).below_target is below
