"""NDI sink and source in separate processes over loopback (unicast discovery via the
session's NDI config: tests/conftest.py)."""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import peers
import pytest
import sync_pattern
from emitted import OnAir, check_carried

from broadcast_filter.media.audio import RATE
from broadcast_filter.media.base import SINKS, SOURCES, MediaError, SourceLost

ndi = pytest.importorskip("NDIlib", reason="ndi-python is not installed (pip install '.[ndi]')")

from broadcast_filter.media.ndi import TICKS_PER_S, UNDEFINED, NdiSink, NdiSource, NdiTimes  # noqa: E402

PEERS = str(Path(__file__).with_name("peers.py"))


def test_ndi_kinds_are_registered():
    assert SOURCES["ndi"] is NdiSource and SINKS["ndi"] is NdiSink


def sources_seen_include(name: str, timeout: float = 60.0) -> str:
    """Look for a source that does not exist until the error lists ``name`` among the
    sources seen (a sender process starting on a busy machine takes a while to announce)."""
    deadline = time.monotonic() + timeout
    while True:
        with pytest.raises(MediaError, match="sources seen") as error:
            missing = NdiSource("ndi:no-such-source", discovery_timeout=2.0, extra_ips="127.0.0.1")
            next(missing.frames())
        if f"({name})" in str(error.value) or time.monotonic() > deadline:
            return str(error.value)


@pytest.mark.slow
@pytest.mark.peers
def test_ndi_sender_process_to_receiver_full_resolution_and_rate():
    """From the first frame received to the last (the newest is never dropped), every frame
    arrives in order or is counted as dropped: by the sender's NdiSink (newest frame wins)
    or by the NDI receive queue (``NdiSource.dropped``). The rate comes from the metadata."""
    name = f"bf-test-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, PEERS, "ndi-send", "--name", name, "--frames", "210",
            "--size", "1280x720", "--fps", "30"]  # fmt: skip
    sender = peers.spawn(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert re.search(rf"sources seen: .*\({name}\)", sources_seen_include(name))
        source = NdiSource(f"ndi:{name}", discovery_timeout=10.0, extra_ips="127.0.0.1")
        received = peers.Received()
        with pytest.raises(SourceLost, match="waiting for sender"):
            for frame in source.frames():
                received.add(frame.image)
        assert source.fps == 30
        receiver_dropped = source.dropped
        assert f"{receiver_dropped} dropped" in source.state or not receiver_dropped
        source.close()
        out, _ = sender.communicate(timeout=30)
        sender_dropped = json.loads(out.splitlines()[-1])["dropped"]
    finally:
        peers.stop_all()
    counters = received.counters
    first = counters[0]
    missing = sorted(set(range(first, 210)) - set(counters))
    print(f"\nNDI 1280x720: {len(counters)} frames from {first}, {len(missing)} missing; "
          f"dropped by the sender {sender_dropped}, by the receive queue {receiver_dropped}; "
          f"latency median {received.median():.1f} ms, p95 {received.p95():.1f} ms")  # fmt: skip
    assert received.sizes == {(1280, 720)}
    assert received.in_order() and received.duplicates() == [], received.gaps()
    assert counters[-1] == 209
    assert len(missing) <= sender_dropped + receiver_dropped, missing
    assert len(counters) >= 0.5 * (210 - first)
    assert received.median() < 10_000


@pytest.mark.slow
@pytest.mark.peers
def test_ndi_source_picks_up_a_sender_that_comes_back():
    """A sender process ends (SourceLost) and a new one of the same name starts: frames()
    called again finds it (wherever it listens now) and receives it. The receiving process
    has an NDI sender of its own, as the daemon has its output: its unicast discovery
    reaches its own NDI process as often as not (see ndi.FINDER_EVERY_S)."""
    name = f"bf-back-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, PEERS, "ndi-send-av", "--name", name, "--frames", "60"]
    own = NdiSink(f"ndi:bf-own-{uuid.uuid4().hex[:6]}", width=32, height=16, fps=30)
    source = NdiSource(f"ndi:{name}", discovery_timeout=30.0, extra_ips="127.0.0.1")
    addresses, counts = [], []
    try:
        for _ in range(2):
            sender = peers.spawn(argv, stdout=subprocess.DEVNULL)
            count = 0
            with pytest.raises(SourceLost, match="waiting for sender"):
                for _frame in source.frames():
                    count += 1
            addresses.append(source._source.url_address)
            counts.append(count)
            assert sender.wait(30) == 0
    finally:
        source.close()
        own.close()
        peers.stop_all()
    print(f"\nsender at {addresses[0]}, then at {addresses[1]}: {counts} frames received")
    assert min(counts) >= 45, counts


def test_ndi_source_needs_a_name():
    with pytest.raises(MediaError, match="needs a source name"):
        NdiSource("ndi:")


@pytest.mark.slow
@pytest.mark.peers
def test_devices_lists_a_running_ndi_sender():
    """``devices`` as a user runs it: a process of its own."""
    name = f"bf-devices-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, PEERS, "ndi-send", "--name", name, "--frames", "300",
            "--size", "64x64", "--fps", "30"]  # fmt: skip
    sender = peers.spawn(argv, stdout=subprocess.DEVNULL)
    devices = [sys.executable, "-m", "broadcast_filter.cli", "devices"]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the sender process needs a while to announce
            done = subprocess.run(devices, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            out = done.stdout
            if f"({name})" in out:
                break
    finally:
        peers.stop(sender)
    print(out.split("NDI sources")[1].split("\n\n")[0])
    assert f"({name})" in out
    assert f"also ndi:{name}" in out


# ---------------------------------------------------------------- audio


def _capture_av(name: str, **source_options) -> tuple[NdiSource, list, list]:
    """Run an NdiSource until the sender is gone: (source, video frames, audio chunks)."""
    source = NdiSource(f"ndi:{name}", discovery_timeout=60.0, extra_ips="127.0.0.1",
                       **source_options)  # fmt: skip
    chunks: list = []
    source.listen_audio(chunks.append)
    frames = []
    with pytest.raises(SourceLost, match="waiting for sender"):
        for frame in source.frames():
            frames.append((frame.captured_at, bool(frame.image.mean() > 200)))
    return source, frames, chunks


def _beeps(chunks: list) -> list[float]:
    finder = peers.BeepFinder(chunks[0].rate if chunks else RATE)
    for chunk in chunks:
        finder.feed(chunk.samples[:, 0], chunk.captured_at)
    return finder.onsets


def _offsets(flashes: list[float], onsets: list[float]) -> list[float]:
    """For each flash, the nearest beep onset minus the flash (seconds)."""
    return [min((o - f for o in onsets), key=abs) for f in flashes] if onsets else []


@pytest.mark.slow
@pytest.mark.peers
@pytest.mark.parametrize(("rate", "channels"), [(48000, 2), (44100, 1)])
def test_ndi_source_stamps_audio_on_the_video_clock(rate, channels):
    """A capture-app-like sender (ndi-python alone) sends white flashes and a 1 kHz beep
    starting at each flash's instant, the audio in 100 ms blocks sent after their video
    (so arrival times would put the beep up to 100 ms late). The source's chunks carry the
    block's samples as sent (the sender's rate and channels), follow each other without
    gaps, and each beep starts within 40 ms of its flash frame's captured_at."""
    name = f"bf-av-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, PEERS, "ndi-send-av", "--name", name, "--frames", "150",
            "--rate", str(rate), "--channels", str(channels), "--block", "3"]  # fmt: skip
    sender = peers.spawn(argv, stdout=subprocess.PIPE, text=True)
    try:
        source, frames, chunks = _capture_av(name)
        out, _ = sender.communicate(timeout=30)
    finally:
        peers.stop_all()
    sent = json.loads(out.splitlines()[-1])
    block = 3 * rate // 30
    lengths = [len(c.samples) for c in chunks]
    assert len(chunks) == sent["audio_frames"], lengths
    assert lengths == [block] * len(chunks), lengths
    assert all(c.samples.shape[1] == channels and c.rate == rate for c in chunks)
    assert all(c.samples.dtype == np.float32 for c in chunks)
    gaps = [b.captured_at - (a.captured_at + len(a.samples) / rate)
            for a, b in itertools.pairwise(chunks)]  # fmt: skip
    flashes = [t for t, white in frames if white]
    offsets = _offsets(flashes, _beeps(chunks))
    print(f"\nNDI {rate} Hz {channels} ch -> source: {len(frames)} frames, {len(chunks)} "
          f"chunks, chunk gaps max {max(map(abs, gaps)) * 1000:.2f} ms; beep - flash "
          f"{[round(float(o) * 1000, 1) for o in offsets]} ms; {source.audio_state}")  # fmt: skip
    assert source.audio_state == f"pcm {rate / 1000:g}k {'mono' if channels == 1 else 'stereo'}"
    assert max(map(abs, gaps)) < 0.005, gaps
    assert len(flashes) == len(sent["flashes"]) == 5
    assert all(abs(o) < 0.040 for o in offsets), offsets


@pytest.mark.slow
@pytest.mark.peers
def test_ndi_source_skips_odd_audio_frames_and_video_goes_on():
    """After every audio block the sender adds a 16-channel frame and one without samples:
    every video frame still arrives, the good audio still does, and the odd frames are
    counted and named in audio_state."""
    name = f"bf-odd-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, PEERS, "ndi-send-av", "--name", name, "--frames", "90", "--odd"]
    sender = peers.spawn(argv, stdout=subprocess.PIPE, text=True)
    try:
        source, frames, chunks = _capture_av(name)
        out, _ = sender.communicate(timeout=30)
    finally:
        peers.stop_all()
    sent = json.loads(out.splitlines()[-1])
    print(f"\nodd audio: {len(frames)} frames, {len(chunks)} chunks; {source.audio_state}")
    assert len(frames) + source.dropped >= 90
    assert len(chunks) == sent["audio_frames"]
    assert source.audio_skipped >= sent["audio_frames"]
    assert "16 channels" in source.audio_state and "skipped" in source.audio_state


@pytest.mark.slow
@pytest.mark.peers
def test_ndi_sink_sends_audio_with_timecodes_matching_its_video():
    """NdiSink with audio, fed like the daemon feeds it: frames on air at their send time,
    the audio of each 100 ms given 0.1 s after it went on air (the audio line's margin),
    with ``at`` = its on-air time. A receiver process (ndi-python alone) gets 48 kHz stereo
    audio frames, and each beep's timecode is within 40 ms of its flash frame's."""
    name = f"bf-sink-av-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, PEERS, "ndi-recv-av", "--name", name, "--seconds", "60"]
    receiver = peers.spawn(argv, stdout=subprocess.PIPE, text=True)
    fps, block, late = 30.0, 3, 0.1
    try:
        with NdiSink(f"ndi:{name}", width=128, height=72, fps=fps, audio="aac") as sink:
            assert sink.audio
            deadline = time.monotonic() + 60
            while "1 receiver" not in sink.state and time.monotonic() < deadline:
                time.sleep(0.1)
            pending: list[tuple[float, np.ndarray, float]] = []  # (send when, samples, at)
            t0 = time.monotonic() + 0.2
            for i in range(150):
                while (delay := t0 + i / fps - time.monotonic()) > 0:
                    if pending and pending[0][0] <= time.monotonic():
                        _, samples, at = pending.pop(0)
                        sink.send_audio(samples, at)
                    else:
                        time.sleep(min(delay, 0.002))
                sink.send(peers.flash_picture(128, 72, i))
                if i % block == 0:
                    first = round(i / fps * RATE)
                    count = round((i + block) / fps * RATE) - first
                    mono = peers.beep_track(first, count, RATE, fps)
                    stereo = np.repeat(mono[:, None], 2, axis=1)
                    pending.append((t0 + i / fps + late, stereo, t0 + first / RATE))
            for _, samples, at in pending:
                sink.send_audio(samples, at)
            time.sleep(0.5)
            audio_dropped = sink.audio_dropped
        out, _ = receiver.communicate(timeout=60)
    finally:
        peers.stop_all()
    got = json.loads(out.splitlines()[-1])
    audio = got["audio"]
    flashes = [v["timecode"] / 1e7 for v in got["video"] if v["flash"]]
    onsets = [t / 1e7 for t in got["onsets"]]
    offsets = _offsets(flashes, onsets)
    stamp_lag = [(a["timestamp"] - a["timecode"]) / 1e4 for a in audio]
    video_lag = [(v["timestamp"] - v["timecode"]) / 1e4 for v in got["video"]]
    print(f"\nNdiSink -> receiver: {len(got['video'])} frames, {len(audio)} audio frames; "
          f"beep - flash timecode {[round(float(o) * 1000, 1) for o in offsets]} ms; timestamp - "
          f"timecode: audio median {np.median(stamp_lag):.1f} ms, video median "
          f"{np.median(video_lag):.1f} ms")  # fmt: skip
    assert audio_dropped == 0
    assert audio and all(a["rate"] == RATE and a["channels"] == 2 for a in audio)
    assert sum(a["samples"] for a in audio) == 50 * 4800
    assert len(flashes) == 5 and len(onsets) == 5
    assert all(abs(o) < 0.040 for o in offsets), offsets


def test_ndi_times_follow_timecodes_and_fall_back_to_send_timestamps():
    """Timecodes (100 ns) that advance with the video are the basis: audio 0.5 s after a
    video frame's timecode is 0.5 s after that frame on the monotonic clock, however late
    it arrives. Video timecodes stuck at 0 switch to the SDK's send timestamps; with
    neither, the audio's arrival is its time."""
    times = NdiTimes()
    for i in range(3):
        times.video(10**10 + i * 333_333, 0, 100.0 + i / 30 + 0.002 * (i == 1))
    assert times.basis == "timecode"
    assert times.audio(10**10 + 5_000_000, 0, 100.9) == pytest.approx(100.5)
    stuck = NdiTimes()
    stuck.video(0, 2 * 10**10, 50.0)
    assert stuck.basis == "send timestamp"
    assert stuck.audio(12345, 2 * 10**10 + 1_000_000, 50.3) == pytest.approx(50.1)
    nothing = NdiTimes()
    nothing.video(0, UNDEFINED, 7.0)
    assert nothing.basis == "arrival" and nothing.audio(0, UNDEFINED, 7.25) == 7.25


def test_ndi_times_fall_back_when_audio_timecodes_are_on_another_basis():
    times = NdiTimes()
    times.video(10**10, 3 * 10**10, 20.0)
    # audio timecode an hour from its video's: not the same basis; the send timestamp is
    assert times.audio(10**10 + 36_000 * TICKS_PER_S, 3 * 10**10 + 2_000_000, 20.4) == (
        pytest.approx(20.2)
    )
    assert times.basis == "send timestamp"


def test_ndi_sink_audio_option():
    with NdiSink(f"ndi:bf-opt-{uuid.uuid4().hex[:6]}", width=32, height=16, fps=30,
                 audio="off") as sink:  # fmt: skip
        assert not sink.audio
        sink.send_audio(np.zeros((480, 2), np.float32), time.monotonic())  # ignored
    with pytest.raises(MediaError, match="audio must be one of"):
        NdiSink("ndi:bf-opt-bad", width=32, height=16, fps=30, audio="mp3")


@pytest.mark.slow
@pytest.mark.peers
def test_daemon_ndi_in_to_ndi_out_keeps_audio_with_video(tmp_path, model_cache):
    """The whole daemon: an NDI sender process (flashes and beeps, audio in 100 ms blocks)
    -> NDI source -> passthrough preset -> NDI sink -> an NDI receiver process.

    What holds whatever the machine's speed (see tests/emitted.py): the receiver's 48 kHz
    stereo audio is continuous, and every flash/beep pair in it, timed by the NDI timecodes,
    has the offset the daemon emitted (logged inside the daemon: each picture handed to the
    sink, each audio chunk on air); a pair out of broadcast tolerance comes with frames the
    daemon counted as off sync."""
    from daemon_harness import running, wait_for, write_config

    src, out = f"bf-e2e-in-{uuid.uuid4().hex[:6]}", f"bf-e2e-out-{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path, source=f"ndi:{src}", sinks=[{"url": f"ndi:{out}"}],
                          size=(128, 64), fps=30, start="passthrough", cache_dir=model_cache,
                          source_options={"discovery_timeout": 30.0})  # fmt: skip
    go = tmp_path / "go"
    recv_argv = [sys.executable, PEERS, "ndi-recv-av", "--name", out, "--seconds", "120",
                 "--idle", "5"]  # fmt: skip
    send_argv = [sys.executable, PEERS, "ndi-send-av", "--name", src, "--frames", "300",
                 "--go", str(go)]  # fmt: skip
    # the sender is announced first; it sends once the daemon's output has its receiver
    sender = peers.spawn(send_argv, stdout=subprocess.PIPE, text=True)
    try:
        assert f"({src})" in sources_seen_include(src)
        with running(config) as (daemon, _, _lines):
            on_air = OnAir(daemon)
            (name,) = on_air.video
            sink = daemon.sinks.sinks[name]
            assert sink.audio
            receiver = peers.spawn(recv_argv, stdout=subprocess.PIPE, text=True)
            wait_for("a receiver on the daemon's output", lambda: "1 receiver" in sink.state, 60)
            go.touch()
            sent = json.loads(sender.communicate(timeout=120)[0].splitlines()[-1])
            time.sleep(1.0)
            status = daemon.status_text(time.monotonic())
            failure = daemon.failure
        try:  # it stops 5 s after the last frame; a receiver NDI keeps waiting is told to
            printed = receiver.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            receiver.send_signal(signal.SIGINT)
            printed = receiver.communicate(timeout=20)[0]
    finally:
        peers.stop_all()
    assert failure is None, failure
    got = json.loads(printed.splitlines()[-1])
    # the receiver's times are the sink's timecodes: UTC for the daemon's monotonic clock
    zero = sink.timecode(0.0) / TICKS_PER_S
    brightness = [(v["timecode"] / TICKS_PER_S - zero, v["brightness"]) for v in got["video"]]
    flashes = sync_pattern.flash_onsets(brightness)
    onsets = [t / TICKS_PER_S - zero for t in got["onsets"]]
    recorded = sync_pattern.pair(flashes, onsets)
    audio = got["audio"]
    span = (audio[-1]["timecode"] - audio[0]["timecode"]) / TICKS_PER_S + (
        audio[-1]["samples"] / RATE
    )
    samples = sum(a["samples"] for a in audio)
    tracker, emitted, dropped = daemon.delay, on_air.pairs(name), on_air.dropped(name)
    print(f"\nNDI -> daemon (passthrough) -> NDI: {len(sent['flashes'])} flashes sent, "
          f"{len(emitted)} pairs emitted, {len(recorded)} received; beep - flash "
          f"{[round(o * 1e3, 1) for _, o in recorded]} ms; receiver got {len(got['video'])} "
          f"frames, {len(audio)} audio frames, {samples} samples over {span:.3f} s; the "
          f"daemon counted {tracker.off_sync} of {tracker.frames} frames off sync; "
          f"{status[-200:]}")  # fmt: skip
    assert audio and all(a["rate"] == RATE and a["channels"] == 2 for a in audio)
    assert abs(samples - span * RATE) <= 2 * 480, "the received audio has gaps or overlaps"
    # a flash frame the daemon's input replaced before it was styled (newest frame wins) is
    # not on air at all: what was emitted is the reference, and all of it is received
    assert len(emitted) >= 3, emitted
    assert len(recorded) >= len(emitted) - dropped, (recorded, emitted)
    offsets = check_carried(recorded, emitted, 0.0, "NDI out", dropped=dropped)
    if not all(sync_pattern.EARLY <= o <= sync_pattern.LATE for o in offsets):
        assert tracker.off_sync > 0, f"out of tolerance, none counted off sync: {offsets}"
