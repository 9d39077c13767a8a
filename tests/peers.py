"""Real peers for network I/O tests and benchmarks: a pixel stamp, publishers, readers, nginx.

The stamp draws a frame counter and the sender's monotonic clock (µs) into the top rows as
16x16 black/white blocks (plus a checksum), which survive H.264 at low bitrates. All
processes on one host share ``CLOCK_MONOTONIC``, so ``now - stamp`` is the glass-to-glass
latency. Run as a script for a publisher or reader in its own process::

    python tests/peers.py publish --url rtmp://127.0.0.1:1935/live/k --format flv --via ffmpeg
    python tests/peers.py read --url rtmp://127.0.0.1:1935/live/k --format flv --seconds 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

BLOCK = 16
COUNTER_BITS, TIME_BITS, CHECK_BITS = 24, 40, 8
BITS = COUNTER_BITS + TIME_BITS + CHECK_BITS
TIME_MOD = 1 << TIME_BITS
NGINX_MODULE = "/usr/lib/nginx/modules/ngx_rtmp_module.so"


def now_us() -> int:
    return time.monotonic_ns() // 1000


def _checksum(counter: int, t_us: int) -> int:
    return (counter * 31 + t_us * 17 + (t_us >> 20)) & 0xFF


def _bit_boxes(width: int) -> list[tuple[int, int]]:
    per_row = width // BLOCK
    return [((i // per_row) * BLOCK, (i % per_row) * BLOCK) for i in range(BITS)]


def stamp(image: np.ndarray, counter: int, t_us: int | None = None) -> np.ndarray:
    """Draw ``counter`` and the time (default: now) into ``image`` in place; return it."""
    t_us = now_us() if t_us is None else t_us
    value = (
        (counter % (1 << COUNTER_BITS))
        | ((t_us % TIME_MOD) << COUNTER_BITS)
        | (_checksum(counter, t_us % TIME_MOD) << (COUNTER_BITS + TIME_BITS))
    )
    for bit, (y, x) in enumerate(_bit_boxes(image.shape[1])):
        image[y : y + BLOCK, x : x + BLOCK] = 255 if (value >> bit) & 1 else 0
    return image


def read_stamp(image: np.ndarray) -> tuple[int, int] | None:
    """``(counter, t_us)`` from an RGB or gray frame, or ``None`` if the checksum fails."""
    luma = image if image.ndim == 2 else image[..., 1]
    value = 0
    for bit, (y, x) in enumerate(_bit_boxes(image.shape[1])):
        inner = luma[y + 4 : y + BLOCK - 4, x + 4 : x + BLOCK - 4]
        value |= int(inner.mean() > 127) << bit
    counter = value & ((1 << COUNTER_BITS) - 1)
    t_us = (value >> COUNTER_BITS) & (TIME_MOD - 1)
    check = value >> (COUNTER_BITS + TIME_BITS)
    return (counter, t_us) if check == _checksum(counter, t_us) else None


def latency_ms(t_us: int, at_us: int | None = None) -> float:
    """Milliseconds from a stamp's time to ``at_us`` (default: now)."""
    at_us = now_us() if at_us is None else at_us
    return ((at_us - t_us) % TIME_MOD) / 1000.0


def pattern(width: int, height: int, counter: int) -> np.ndarray:
    """A moving test picture (so the encoder has real work) with the stamp on top."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0] = (x + counter * 4) % 256
    image[..., 1] = (y + counter * 2) % 256
    image[..., 2] = 128
    return stamp(image, counter)


class Pictures:
    """Pre-rendered backgrounds so stamping a frame costs microseconds, not milliseconds."""

    def __init__(self, width: int, height: int, count: int = 30) -> None:
        self.frames = [pattern(width, height, i) for i in range(count)]

    def get(self, counter: int) -> np.ndarray:
        return stamp(self.frames[counter % len(self.frames)].copy(), counter)


@dataclass
class Received:
    """Counters and latencies seen by a receiver."""

    counters: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    sizes: set[tuple[int, int]] = field(default_factory=set)
    #: every decoded frame, stamp readable or not
    frames: int = 0

    def add(self, image: np.ndarray, at_us: int | None = None) -> None:
        found = read_stamp(image)
        if found is not None:
            self.counters.append(found[0])
            self.latencies.append(latency_ms(found[1], at_us))
            self.sizes.add((image.shape[1], image.shape[0]))

    def since(self, counter: int) -> Received:
        """The frames whose counter is at least ``counter``."""
        keep = [i for i, c in enumerate(self.counters) if c >= counter]
        return Received([self.counters[i] for i in keep], [self.latencies[i] for i in keep],
                        set(self.sizes), len(keep))  # fmt: skip

    def duplicates(self) -> list[int]:
        """Counters seen more than once."""
        return sorted({c for c in self.counters if self.counters.count(c) > 1})

    def in_order(self) -> bool:
        """Each counter is larger than the one before: nothing reordered or repeated."""
        return all(a < b for a, b in zip(self.counters, self.counters[1:], strict=False))

    def gaps(self) -> list[tuple[int, int]]:
        """Pairs of consecutive counters that are not +1 (loss or reordering)."""
        return [
            (a, b) for a, b in zip(self.counters, self.counters[1:], strict=False) if b != a + 1
        ]

    def median(self) -> float:
        return float(np.median(self.latencies)) if self.latencies else float("nan")

    def p95(self) -> float:
        return float(np.percentile(self.latencies, 95)) if self.latencies else float("nan")


# ---------------------------------------------------------------- ports, processes, nginx


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: every peer process started through :func:`spawn`, stopped by :func:`stop_all`
STARTED: list[subprocess.Popen] = []


def spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    """Start a peer process and remember it, so :func:`stop_all` (a test's teardown) stops it
    even when the test fails half way."""
    proc = subprocess.Popen(argv, **kwargs)
    STARTED.append(proc)
    return proc


def stop_all() -> None:
    """Stop every peer :func:`spawn` started (by PID) that is still running."""
    while STARTED:
        stop(STARTED.pop())


def stop(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """Stop a child by its PID (SIGTERM, then SIGKILL) and reap it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)


def wait_port(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def nginx_missing() -> str | None:
    """Why an nginx-rtmp test cannot run here, or ``None``."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        return "nginx is not installed (apt-get install nginx libnginx-mod-rtmp)"
    if not Path(NGINX_MODULE).exists():
        return "the nginx RTMP module is not installed (apt-get install libnginx-mod-rtmp)"
    return None


class Nginx:
    """nginx-rtmp on 127.0.0.1:PORT with a temp config, ``daemon off``; stopped by PID."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="nginx-rtmp-"))
        (self.dir / "logs").mkdir()
        (self.dir / "nginx.conf").write_text(
            f"load_module {NGINX_MODULE};\n"
            "daemon off;\nmaster_process off;\nworker_processes 1;\n"
            f"pid {self.dir}/nginx.pid;\nerror_log {self.dir}/logs/error.log warn;\n"
            "events { worker_connections 64; }\n"
            f"rtmp {{ server {{ listen 127.0.0.1:{self.port}; chunk_size 4096;\n"
            "  application live { live on; record off; } } }\n"
        )
        self.proc: subprocess.Popen | None = None

    def url(self, key: str = "test") -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{key}"

    def start(self) -> Nginx:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = spawn(
            [nginx, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e", "stderr"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        return self

    def kill(self) -> None:
        """Hard kill (SIGKILL) by PID, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- publishers and readers


def udp_bound(port: int) -> bool:
    """Whether something has bound 127.0.0.1:``port`` (UDP): a reader is ready to receive."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def publish(
    url: str,
    fmt: str,
    *,
    frames: int,
    fps: float = 30.0,
    size: tuple[int, int] = (512, 512),
    start: int = 0,
    via: str = "pyav",
    retry_for: float = 10.0,
) -> int:
    """Publish ``frames`` stamped frames paced at ``fps``; return how many were sent.

    ``via="pyav"`` encodes in this process; ``via="ffmpeg"`` pipes raw RGB into the Debian
    ffmpeg CLI (an independent implementation, and the only one here that speaks SRT).
    Connection refusals are retried for ``retry_for`` seconds (a listener may not be up yet).
    """
    pictures = Pictures(*size)
    deadline = time.monotonic() + retry_for
    while True:
        try:
            if via == "ffmpeg":
                return _publish_ffmpeg(url, fmt, pictures, frames, fps, size, start)
            return _publish_pyav(url, fmt, pictures, frames, fps, size, start)
        except (ConnectionError, OSError) as exc:
            if time.monotonic() > deadline:
                raise
            print(f"publisher retrying: {exc}", file=sys.stderr)
            time.sleep(0.2)


def _paced(frames: int, fps: float) -> Iterator[int]:
    t0 = time.monotonic()
    for i in range(frames):
        delay = t0 + i / fps - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield i


def _publish_pyav(url, fmt, pictures, frames, fps, size, start) -> int:
    import av

    options = {"pkt_size": "1316"} if fmt == "mpegts" else {}
    with av.open(url, "w", format=fmt, options=options, timeout=5.0) as container:
        stream = container.add_stream(
            "libx264",
            rate=Fraction(fps).limit_denominator(1001),
            options={"preset": "ultrafast", "tune": "zerolatency", "g": str(round(fps))},
        )
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 2_000_000
        container.start_encoding()
        for i in _paced(frames, fps):
            frame = av.VideoFrame.from_ndarray(pictures.get(start + i), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return frames


def _publish_ffmpeg(url, fmt, pictures, frames, fps, size, start) -> int:
    argv = [
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
        "-s", f"{size[0]}x{size[1]}", "-r", str(fps), "-i", "-", "-c:v", "libx264",
        "-preset", "ultrafast", "-tune", "zerolatency", "-g", str(round(fps)), "-b:v", "2M",
        "-pix_fmt", "yuv420p", "-f", fmt, url,
    ]  # fmt: skip
    proc = spawn(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        for i in _paced(frames, fps):
            proc.stdin.write(pictures.get(start + i).tobytes())
            proc.stdin.flush()
        proc.stdin.close()
        proc.wait(10)
    except (BrokenPipeError, subprocess.TimeoutExpired):
        pass
    finally:
        stop(proc)
    if proc.returncode not in (0, None) and proc.stderr is not None:
        raise ConnectionError(proc.stderr.read().decode(errors="replace").strip()[-300:])
    return frames


def video_frames(container: Any) -> Iterator[Any]:
    """The decoded video frames of a PyAV input container, as a player shows them: packets
    the decoder refuses (before the first keyframe of a stream joined mid-way) are skipped."""
    import av.error

    for packet in container.demux(video=0):
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            continue
        yield from frames


def read(url: str, fmt: str, seconds: float, *, until_end: float = 0.0) -> Received:
    """Decode a stream with PyAV alone (independent of our sources) and collect stamps.

    It reads for ``seconds`` at most. With ``until_end`` it stops earlier, at the end of the
    stream once frames have arrived: an RTMP end of stream, or ``until_end`` seconds without
    data (UDP has no end), so a slow start or a loaded CPU never cuts the stream short."""
    import av
    import av.error

    received = Received()
    deadline = time.monotonic() + seconds
    options = {"probesize": "32768", "analyzeduration": "0"}
    if fmt == "mpegts":
        options |= {"overrun_nonfatal": "1", "fifo_size": "50000"}
    read_timeout = until_end or 1.0
    while time.monotonic() < deadline:
        try:
            timeout = (3.0, read_timeout)
            with av.open(url, format=fmt, options=options, timeout=timeout) as container:
                for frame in video_frames(container):
                    received.add(frame.to_ndarray(format="gray"))
                    received.frames += 1
                    if time.monotonic() > deadline:
                        break
        except av.error.FFmpegError:
            time.sleep(0.1)
        if until_end and received.frames:
            break
    return received


class FfmpegSrtReader:
    """The ffmpeg CLI as an SRT listener that decodes to raw gray frames we stamp-read."""

    def __init__(self, port: int, size: tuple[int, int]) -> None:
        self.size = size
        self.received = Received()
        url = f"srt://127.0.0.1:{port}?mode=listener&latency=20000"
        # -fps_mode passthrough: hand over each decoded frame once, as it came; the default
        # (cfr for rawvideo) duplicates and drops frames to fit a constant rate.
        argv = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-probesize", "32768",
                "-analyzeduration", "0", "-i", url, "-fps_mode", "passthrough",
                "-f", "rawvideo", "-pix_fmt", "gray", "-"]  # fmt: skip
        self.proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        width, height = self.size
        assert self.proc.stdout is not None
        while data := self.proc.stdout.read(width * height):
            if len(data) == width * height:
                gray = np.frombuffer(data, np.uint8).reshape(height, width)
                self.received.add(gray)
                self.received.frames += 1

    def stop(self, wait: float = 0.0) -> Received:
        """Stop it, first waiting up to ``wait`` s for it to end by itself (the caller hung
        up: ffmpeg decodes what it has and exits)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(wait)
        stop(self.proc)
        self._thread.join(5)
        return self.received


def ndi_send(name: str, *, frames: int, fps: float, size: tuple[int, int], start: int = 0) -> int:
    """Publish stamped frames with our NdiSink, paced at ``fps`` (run it in its own process);
    return how many the sink dropped (newest frame wins)."""
    from broadcast_filter.media.ndi import NdiSink

    pictures = Pictures(*size)
    with NdiSink(f"ndi:{name}", width=size[0], height=size[1], fps=fps) as sink:
        for i in _paced(frames, fps):
            sink.send(pictures.get(start + i))
        time.sleep(0.2)
    return sink.dropped


# ---------------------------------------------------------------- NDI audio + video

#: flash/beep pattern of the NDI audio tests: every FLASH_EVERY frames one white frame, and
#: a BEEP_HZ sine burst of BEEP_S starting at that frame's instant; all else dark and silent
FLASH_EVERY = 30
BEEP_HZ = 1000.0
BEEP_S = 0.1
DARK = 40


def is_flash(counter: int) -> bool:
    return counter % FLASH_EVERY == FLASH_EVERY // 2


def flash_picture(width: int, height: int, counter: int) -> np.ndarray:
    """White on a flash frame, dark grey otherwise (RGB)."""
    return np.full((height, width, 3), 255 if is_flash(counter) else DARK, np.uint8)


def beep_track(first: int, count: int, rate: int, fps: float) -> np.ndarray:
    """Samples ``first .. first+count`` (float32, mono) of the beep track at ``rate``: a sine
    burst from each flash frame's instant (``counter / fps``) on for :data:`BEEP_S`."""
    t = (first + np.arange(count)) / rate
    since_flash = (t - (FLASH_EVERY // 2) / fps) % (FLASH_EVERY / fps)
    on = since_flash < BEEP_S
    return (0.5 * np.sin(2 * np.pi * BEEP_HZ * t) * on).astype(np.float32)


class BeepFinder:
    """Onsets of beeps in a contiguous feed of audio blocks: the first loud sample after at
    least 1 ms of quiet (the sine is loud several times per ms while it sounds)."""

    LOUD = 0.05

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.quiet = rate  # samples since the last loud one
        self.onsets: list[float] = []

    def feed(self, mono: np.ndarray, first_at: float) -> None:
        """Samples whose first one is at ``first_at`` (seconds on any clock)."""
        for i in np.flatnonzero(np.abs(mono) > self.LOUD):
            if self.quiet + i > self.rate // 1000:
                self.onsets.append(first_at + i / self.rate)
            self.quiet = -int(i) - 1
        self.quiet += len(mono)


def _ndi():
    import NDIlib

    if not NDIlib.initialize():
        raise RuntimeError("NDI runtime failed to start")
    return NDIlib


def utc_ticks(monotonic: float) -> int:
    """A monotonic time as an NDI timecode: UTC in 100 ns units."""
    return round((monotonic + time.time() - time.monotonic()) * 10_000_000)


def ndi_send_av(
    name: str,
    *,
    frames: int,
    fps: float,
    size: tuple[int, int],
    rate: int,
    channels: int,
    block: int,
    odd: bool,
    wait: float = 60.0,
    go: str | None = None,
) -> dict:
    """An NDI sender like a capture app, on ndi-python alone: flash frames at ``fps`` and the
    beep track in audio frames of ``block`` video frames each, sent only after their last
    video frame (as a capture app buffers audio), every frame's timecode the instant it was
    captured. ``odd`` adds a 16-channel and a 0-sample audio frame after each block. It waits
    up to ``wait`` s for a receiver before the first frame (and for the file ``go`` to
    exist, when given). Returns the flash timecodes."""
    ndi = _ndi()
    settings = ndi.SendCreate()
    settings.ndi_name = name
    settings.clock_video = settings.clock_audio = False
    sender = ndi.send_create(settings)
    video = ndi.VideoFrameV2()
    video.FourCC = ndi.FOURCC_VIDEO_TYPE_RGBX
    video.frame_rate_N, video.frame_rate_D = (
        Fraction(fps).limit_denominator(1001).as_integer_ratio()
    )
    audio = ndi.AudioFrameV2()
    audio.sample_rate, audio.no_channels = rate, channels
    ndi.send_get_no_connections(sender, int(wait * 1000))
    deadline = time.monotonic() + wait
    while go is not None and not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    rgbx = np.full((size[1], size[0], 4), 255, np.uint8)
    flashes, sent = [], 0
    t0 = time.monotonic() + 0.2
    for i in range(frames):
        delay = t0 + i / fps - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        rgbx[:, :, :3] = flash_picture(*size, i)
        video.data = rgbx
        video.timecode = utc_ticks(t0 + i / fps)
        if is_flash(i):
            flashes.append(video.timecode)
        ndi.send_send_video_v2(sender, video)
        if (i + 1) % block:
            continue
        first = round((i + 1 - block) / fps * rate)
        count = round((i + 1) / fps * rate) - first
        track = beep_track(first, count, rate, fps)
        planar = np.ascontiguousarray(np.repeat(track[None], channels, axis=0))
        audio.data, audio.no_samples = planar, count
        audio.no_channels = channels
        audio.timecode = utc_ticks(t0 + first / rate)
        ndi.send_send_audio_v2(sender, audio)
        sent += 1
        if odd:
            many = np.zeros((16, 480), np.float32)  # more than any layout the daemon knows
            audio.data, audio.no_channels, audio.no_samples = many, 16, 480
            ndi.send_send_audio_v2(sender, audio)
            audio.no_samples = 0
            audio.no_channels = channels
            ndi.send_send_audio_v2(sender, audio)
    time.sleep(0.5)
    ndi.send_destroy(sender)
    return {"flashes": flashes, "audio_frames": sent}


def _find_ndi(ndi, name: str, deadline: float):
    """The NDI source called ``name`` (``MACHINE (name)``), or ``None`` by ``deadline``. A
    unicast query reaches one NDI process of the host at random (they share port 5960), so
    each round asks with a fresh finder (as the product's ``discover`` does)."""
    settings = ndi.FindCreate()
    settings.extra_ips = "127.0.0.1"
    while time.monotonic() < deadline:
        finder = ndi.find_create_v2(settings)
        try:
            ndi.find_wait_for_sources(finder, 1000)
            for source in ndi.find_get_current_sources(finder):
                if source.ndi_name.endswith(f"({name})"):
                    found = ndi.Source()  # a copy that outlives the finder
                    found.ndi_name, found.url_address = source.ndi_name, source.url_address
                    return found
        finally:
            ndi.find_destroy(finder)
    return None


#: set by SIGINT in ``ndi-recv-av``: stop receiving and print what came
_RECEIVED_ENOUGH = threading.Event()


def ndi_recv_av(name: str, *, seconds: float, idle: float) -> dict:
    """Receive an NDI source on ndi-python alone for up to ``seconds`` (until ``idle`` s
    without frames once some came, or SIGINT): every video frame's timecode, timestamp,
    brightness and whether it is a flash; every audio frame's format and times, and the
    beep onsets as timecodes."""
    ndi = _ndi()
    deadline = time.monotonic() + seconds
    settings = ndi.RecvCreateV3()
    settings.color_format = ndi.RECV_COLOR_FORMAT_RGBX_RGBA
    source = _find_ndi(ndi, name, deadline)
    if source is None:
        raise SystemExit(f"NDI source {name!r} not found within {seconds:g} s")
    settings.source_to_connect_to = source
    print(f"ndi-recv-av: {source.ndi_name} at {source.url_address}", file=sys.stderr, flush=True)
    receiver = ndi.recv_create_v3(settings)
    videos, audios = [], []
    finders: dict[int, BeepFinder] = {}
    onsets: list[int] = []
    last = None
    while time.monotonic() < deadline and (last is None or time.monotonic() - last < idle):
        if _RECEIVED_ENOUGH.is_set():
            break
        kind, video, audio, _ = ndi.recv_capture_v3(receiver, 200, True, True, False)
        if kind == ndi.FRAME_TYPE_VIDEO:
            brightness = float(video.data[:, :, :3].mean())
            videos.append({"timecode": video.timecode, "timestamp": video.timestamp,
                           "brightness": brightness, "flash": brightness > 200})  # fmt: skip
            ndi.recv_free_video_v2(receiver, video)
            last = time.monotonic()
        elif kind == ndi.FRAME_TYPE_AUDIO:
            rate, count = audio.sample_rate, audio.no_samples
            audios.append({"timecode": audio.timecode, "timestamp": audio.timestamp,
                           "rate": rate, "channels": audio.no_channels,
                           "samples": count})  # fmt: skip
            if count:
                mono = np.array(audio.data[0, :count], np.float32)
                beeps = finders.setdefault(rate, BeepFinder(rate))
                before = len(beeps.onsets)
                beeps.feed(mono, audio.timecode / 10_000_000)
                onsets += [round(t * 10_000_000) for t in beeps.onsets[before:]]
            ndi.recv_free_audio_v3(receiver, audio)
            last = time.monotonic()
    result = {"video": videos, "audio": audios, "onsets": onsets}
    print(json.dumps(result), flush=True)  # before the destroy, which may wait on the network
    ndi.recv_destroy(receiver)
    return result


def main() -> None:
    # SIGTERM (peers.stop) must run the finally blocks, which stop this script's own ffmpeg:
    # otherwise an ffmpeg listener still waiting for a caller outlives us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish")
    pub.add_argument("--url", required=True)
    pub.add_argument("--format", required=True)
    pub.add_argument("--frames", type=int, default=90)
    pub.add_argument("--fps", type=float, default=30.0)
    pub.add_argument("--size", default="512x512")
    pub.add_argument("--start", type=int, default=0)
    pub.add_argument("--via", choices=["pyav", "ffmpeg"], default="pyav")
    nd = sub.add_parser("ndi-send")
    nd.add_argument("--name", required=True)
    nd.add_argument("--frames", type=int, default=90)
    nd.add_argument("--fps", type=float, default=30.0)
    nd.add_argument("--size", default="512x512")
    nd.add_argument("--start", type=int, default=0)
    av_send = sub.add_parser("ndi-send-av")
    av_send.add_argument("--name", required=True)
    av_send.add_argument("--frames", type=int, default=150)
    av_send.add_argument("--fps", type=float, default=30.0)
    av_send.add_argument("--size", default="128x72")
    av_send.add_argument("--rate", type=int, default=48000)
    av_send.add_argument("--channels", type=int, default=2)
    av_send.add_argument("--block", type=int, default=3)
    av_send.add_argument("--odd", action="store_true")
    av_send.add_argument("--go", help="wait for this file to exist before sending")
    av_recv = sub.add_parser("ndi-recv-av")
    av_recv.add_argument("--name", required=True)
    av_recv.add_argument("--seconds", type=float, default=30.0)
    av_recv.add_argument("--idle", type=float, default=2.0, help="stop after so long without")
    rd = sub.add_parser("read")
    rd.add_argument("--url", required=True)
    rd.add_argument("--format", required=True)
    rd.add_argument("--seconds", type=float, default=5.0)
    rd.add_argument("--until-end", type=float, default=0.0)
    args = parser.parse_args()
    size = tuple(int(v) for v in getattr(args, "size", "0x0").split("x"))
    if args.command == "ndi-send":
        dropped = ndi_send(args.name, frames=args.frames, fps=args.fps, size=size, start=args.start)
        print(json.dumps({"dropped": dropped}), flush=True)
    elif args.command == "ndi-send-av":
        sent = ndi_send_av(args.name, frames=args.frames, fps=args.fps, size=size,
                           rate=args.rate, channels=args.channels, block=args.block,
                           odd=args.odd, go=args.go)  # fmt: skip
        print(json.dumps(sent), flush=True)
    elif args.command == "ndi-recv-av":  # prints its JSON itself
        signal.signal(signal.SIGINT, lambda *_: _RECEIVED_ENOUGH.set())
        ndi_recv_av(args.name, seconds=args.seconds, idle=args.idle)
    elif args.command == "publish":
        publish(args.url, args.format, frames=args.frames, fps=args.fps, size=size,
                start=args.start, via=args.via)  # fmt: skip
    else:
        got = read(args.url, args.format, args.seconds, until_end=args.until_end)
        print(json.dumps({"counters": got.counters, "latencies": got.latencies,
                          "sizes": sorted(got.sizes), "frames": got.frames}))  # fmt: skip


if __name__ == "__main__":
    main()
